"""The README's Python example runs as written."""

import os
import re

from conftest import REPO


def test_readme_python_blocks_run():
    with open(os.path.join(REPO, "README.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert blocks
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (8, 16, 256)
    assert len(namespace["new"]) == 2


def _losses(text: str) -> dict[str, tuple[str, str]]:
    """The demo's figures a text quotes: {"training" | "held-out": (first, last)}."""
    text = " ".join(text.split())
    out = {}
    for kind in ("training", "held-out"):
        pattern = rf"{kind} loss (?:falls )?(?:from )?(\d\.\d\d) \(step \d+\) (?:to|->) (\d\.\d\d)"
        (found,) = re.findall(pattern, text)
        out[kind] = found
    return out


def test_the_readme_and_the_demo_config_quote_the_same_figures():
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    with open(os.path.join(REPO, "configs", "demo.py")) as f:
        config = f.read().split('"""')[1]
    assert _losses(readme) == _losses(config)
