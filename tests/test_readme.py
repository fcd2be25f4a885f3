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


def test_readme_shell_commands_are_accepted_by_the_cli():
    """Every `adn ...` command in the README's code blocks parses: no misspelt or removed flag."""
    import shlex

    from adn.cli import build_parser
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    commands = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", readme, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("adn "):
                commands.append(line)
    assert len(commands) >= 6, commands
    parser = build_parser()
    for command in commands:
        args = parser.parse_args(shlex.split(command)[1:])
        assert callable(args.run), command
