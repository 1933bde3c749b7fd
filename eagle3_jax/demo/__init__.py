"""The embedded demo pair: a small Qwen3-architecture code model and its EAGLE-3 head.

Both were trained by this project on the CPython standard library sources
(tests excluded); see ``docs/demo.md`` for the commands that rebuild them and
their training figures. :func:`demo_paths` returns where they live.
"""

import os

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")


def demo_paths() -> tuple[str, str]:
    """(target directory, head directory) of the embedded demo pair."""
    return os.path.join(ASSETS, "target"), os.path.join(ASSETS, "head")
