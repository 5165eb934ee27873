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
