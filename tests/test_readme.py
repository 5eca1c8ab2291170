"""README, registry and CI agree."""

import re
from pathlib import Path

from homodyne_steps.physics.registry import REGISTRY

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_parameter_table_is_the_registry():
    block = re.search(
        r"<!-- parameter-table:start -->\n(.*?)\n<!-- parameter-table:end -->", README, re.S
    )
    assert block, "README lacks the generated parameter table"
    assert block.group(1).strip() == REGISTRY.markdown_table()


def test_readme_has_two_commands_and_ci_runs_the_test_one():
    section = README.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    commands = [
        line
        for line in re.findall(r"```bash\n(.*?)```", section, re.S)[0].splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert len(commands) == 2, commands
    test_command = next(c for c in commands if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert test_command in ci.splitlines()
