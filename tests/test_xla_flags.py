"""``eagle3_jax.apply_default_flags()``: an explicit call, never a side effect of ``import eagle3_jax``.

Each case runs in a fresh interpreter, since ``XLA_FLAGS`` belongs to the
process (and XLA reads it once, when JAX starts a backend).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

FLAG = "--xla_gpu_enable_triton_gemm=false"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flags_after(code: str, **env: str) -> dict:
    """``XLA_FLAGS`` (None when unset) after ``import eagle3_jax`` and then after ``code``."""
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "EAGLE3_JAX_KEEP_XLA_FLAGS")}
    script = (
        "import json, os\n"
        "before = os.environ.get('XLA_FLAGS')\n"
        "import eagle3_jax\n"
        "imported = os.environ.get('XLA_FLAGS')\n"
        f"{code}\n"
        "print(json.dumps({'before': before, 'imported': imported, 'after': os.environ.get('XLA_FLAGS')}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env={**base, **env}, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_leaves_xla_flags_alone():
    assert _flags_after("pass") == {"before": None, "imported": None, "after": None}
    user = "--xla_force_host_platform_device_count=2"
    assert _flags_after("pass", XLA_FLAGS=user) == {"before": user, "imported": user, "after": user}


def test_apply_default_flags_adds_the_flag():
    out = _flags_after("eagle3_jax.apply_default_flags()")
    assert out["imported"] is None and out["after"] == FLAG


def test_apply_default_flags_keeps_other_user_flags():
    user = "--xla_force_host_platform_device_count=2"
    out = _flags_after("eagle3_jax.apply_default_flags()", XLA_FLAGS=user)
    assert out["after"] == f"{user} {FLAG}"


def test_a_user_flag_wins():
    user = "--xla_gpu_enable_triton_gemm=true"
    out = _flags_after("eagle3_jax.apply_default_flags()", XLA_FLAGS=user)
    assert out["after"] == user


def test_keep_xla_flags_opts_out():
    out = _flags_after("eagle3_jax.apply_default_flags()", EAGLE3_JAX_KEEP_XLA_FLAGS="1")
    assert out["after"] is None
    user = "--xla_force_host_platform_device_count=2"
    out = _flags_after("eagle3_jax.apply_default_flags()", XLA_FLAGS=user, EAGLE3_JAX_KEEP_XLA_FLAGS="1")
    assert out["after"] == user


def test_the_command_line_applies_the_flag():
    out = _flags_after("from eagle3_jax.cli import main\n"
                       "try:\n"
                       "    main(['--version'])\n"
                       "except SystemExit:\n"
                       "    pass")
    assert out["imported"] is None and out["after"] == FLAG
