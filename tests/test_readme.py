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
    assert len(commands) >= 5, commands
    parser = build_parser()
    for command in commands:
        args = parser.parse_args(shlex.split(command)[1:])
        assert callable(args.run), command


ROOT = Path(__file__).resolve().parents[1]
# Where a page states which method `adn train` runs by default: "`--method X` (default)", "(`--method X`,
# the default)", "the default is Algorithm 1", ... (Algorithm 1 is --method adn).
DEFAULT_STATEMENTS = (
    re.compile(r"`--method (\w+)`\)?,? \(?(?:the )?default\b"),
    re.compile(r"\bdefault (?:is|stays|remains|becomes|became) (?:the paper's )?(Algorithm 1|`--method \w+`|joint)"),
)


def _stated_defaults(text: str) -> list[str]:
    found = []
    for pattern in DEFAULT_STATEMENTS:
        for match in pattern.finditer(" ".join(text.split())):  # statements broken over lines too
            stated = match.group(1).strip("`").removeprefix("--method ")
            found.append("adn" if stated == "Algorithm 1" else stated)
    return found


def test_every_page_states_the_real_default_method():
    """The default of `adn train --method` as `--help` prints it is the one README, docs and the demo state."""
    from adn.cli import build_parser
    from adn.vision.train_config import TrainConfig

    parser = build_parser()
    train = next(a for a in parser._actions if a.dest == "command").choices["train"]
    text = train.format_help()
    option = text[text.index("\n  --method {") :]
    option = option[: option.index("\n  --", 1)]  # --method's entry alone, up to the next option
    default = re.search(r"\(default: (\w+)\)", option).group(1)
    assert default == TrainConfig().method == "joint"
    assert "the paper's Algorithm 1" in " ".join(option.split())  # one flag away, named so a reader finds it
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    stated = {page.relative_to(ROOT).as_posix(): _stated_defaults(page.read_text()) for page in pages}
    wrong = {page: methods for page, methods in stated.items() if any(m != default for m in methods)}
    assert not wrong, f"pages that state another default than `adn train --help` ({default}): {wrong}"
    for page in ("README.md", "docs/training.md"):  # the pages a user reads first say it at all
        assert stated[page], page
    demo = (ROOT / "scripts" / "demo.sh").read_text()
    assert "adn train" in demo.replace("$ADN train", "adn train") and "--method" not in demo.split("TXT")[-1]
    assert "with Algorithm 1" not in demo


def test_the_default_statement_finder_finds_statements():
    assert _stated_defaults("Algorithm 1 (`--method adn`, the default) ended") == ["adn"]
    assert _stated_defaults("| `--method joint` (default) | super-net") == ["joint"]
    assert _stated_defaults("`adn train`'s default stays\n Algorithm 1, which") == ["adn"]
    assert _stated_defaults("`--method adn` (Algorithm 1, with `--base-ce 0`, its default)") == []
