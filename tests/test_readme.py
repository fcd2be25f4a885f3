"""The README's Python example must run verbatim."""
import re
from pathlib import Path


def test_readme_python_example_runs():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    net = namespace["net"]
    assert str(net.skip) == "TTFF" and type(namespace["plain"]).__name__ == "ResNet"
    assert all(p.grad is not None for p in net.fc.parameters())
