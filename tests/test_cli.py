"""The commands speak alike: every entry point's --help runs, names the command as it is typed and shows
each flag's default; the README's table of commands names every entry point, and nothing else."""
import argparse
import importlib
import importlib.util
import re

import pytest

from conftest import REPO

ENTRY_POINTS = ["python jobs/preprocess.py"] + [f"python -m {m}" for m in (
    "pipeline.sample", "pipeline.miniature", "pipeline.verify", "pipeline.bench", "pipeline.bench_storage",
    "trainer.run", "trainer.evaluate", "trainer.predict", "trainer.bench",
    "trainer.stage_times", "trainer.worker_scaling", "trainer.gpu_check", "trainer.study")]


def main_of(command):
    """The main(argv) that `command` runs."""
    if command.endswith(".py"):
        spec = importlib.util.spec_from_file_location("preprocess_job", REPO / command.split()[-1])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.main
    return importlib.import_module(command.split()[-1]).main


def blocks(text) -> dict:
    """{first option string: its lines of the help}, for every flag --help lists."""
    found, current = {}, None
    for line in text.splitlines():
        m = re.match(r"  (-[-\w]+)", line)
        if m:
            current = m[1]
            found[current] = line
        elif current and line.startswith("   "):
            found[current] += " " + line.strip()
        else:
            current = None
    return found


@pytest.mark.parametrize("command", ENTRY_POINTS)
def test_help_shows_every_default(command, monkeypatch, capsys):
    parsers = []
    parse_args = argparse.ArgumentParser.parse_args

    def recorded(self, *args, **kwargs):
        parsers.append(self)
        return parse_args(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", recorded)
    with pytest.raises(SystemExit) as exited:
        main_of(command)(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: {command} "), text[:200]
    shown = blocks(text)
    for action in parsers[0]._actions:
        if not action.option_strings or action.required or action.default in (None, "", argparse.SUPPRESS):
            continue
        assert "default" in shown[action.option_strings[0]], shown[action.option_strings[0]]
    assert "--no-resume" not in text
    if "--device" in shown:
        assert "{cpu,cuda}" in shown["--device"]


def readme_commands() -> list:
    """The first cell of every row of README.md's table of commands, as `python ...` or `make ...`."""
    rows = re.findall(r"^\| `((?:python|make) [^`]*)` \|", (REPO / "README.md").read_text(), re.M)
    return [re.match(r"(make \S+|python -m \S+|python \S+\.py)", row)[1] for row in rows]


def test_readme_table_names_every_command():
    commands = readme_commands()
    assert sorted(c for c in commands if c.startswith("python")) == sorted(ENTRY_POINTS)
    targets = re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M)
    assert [c for c in commands if c.startswith("make") and c.split()[1] not in targets] == []
