"""`dlnotes list` starts fast: its plain forms skip Typer (dlnotes.entry), and the catalog tokenizes only the
Config lines. Both must give exactly what the slow, general paths give."""

from __future__ import annotations

import io
import json
import os
import sys
import tokenize
from pathlib import Path

import pytest

from dlnotes import catalog, cli, entry, launch, listing


@pytest.mark.parametrize("args, options", [
    (["list"], {"tag": None, "as_json": False}),
    (["list", "--json"], {"tag": None, "as_json": True}),
    (["list", "--tag", "cnn", "--json"], {"tag": "cnn", "as_json": True}),
    (["list", "--tag=vision"], {"tag": "vision", "as_json": False}),
])
def test_plain_list_command_lines_take_the_short_way(args: list[str], options: dict) -> None:
    assert listing.plain_list_options(args) == options


@pytest.mark.parametrize("args", [
    [], ["run", "mlp"], ["show", "list"], ["list", "--help"], ["list", "--tag"], ["list", "--tag", "--json"],
    ["list", "--jsn"], ["list", "--json", "--json"], ["list", "--tag", "a", "--tag", "b"], ["list", "--tag="],
    ["list", "extra"],
])
def test_every_other_command_line_goes_to_typer(args: list[str]) -> None:
    assert listing.plain_list_options(args) is None


@pytest.mark.parametrize("args", [["list", "--json"], ["list", "--tag", "cnn", "--json"], ["list", "--tag", "cnn"]])
def test_the_short_way_prints_what_typer_prints(args: list[str], invoke, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # the same table width for both
    monkeypatch.setattr(sys, "argv", ["dlnotes", *args])
    monkeypatch.setattr(cli, "app", lambda: pytest.fail("the short way called Typer"))
    entry.main()
    short = capsys.readouterr().out
    typer_output = invoke(*args, env={"COLUMNS": "200"}).output
    assert short == typer_output and "cnn-mnist" in short
    if "--json" in args:
        assert json.loads(short)


def test_field_help_comes_from_the_config_lines_alone(tmp_path: Path) -> None:
    """The help text of every shipped recipe's flags is what tokenizing the whole file finds; a default written
    over several lines and non-ASCII text before the comment are read right too."""
    for info in catalog.all_recipes().values():
        source = info.path.read_text(encoding="utf-8")
        every = {t.start[0]: t.string.lstrip("#").strip()
                 for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}
        nodes = catalog._config_nodes(catalog._parse(info.path)[0])
        assert catalog._line_comments(source, nodes.values()) == {
            n.lineno: every[n.lineno] for n in nodes.values() if n.lineno in every}, info.id
    recipe = tmp_path / "odd.py"
    recipe.write_text('"""Odd."""\nfrom dataclasses import dataclass\n\n\n@dataclass\nclass Config:\n'
                      '    name: str = "é ü"  # accents before the comment\n'
                      '    sizes: str = (  # a default over lines\n        "a"\n    )\n    plain: int = 3\n')
    fields = {f.name: f.help for f in catalog.read_recipe(recipe).fields}
    assert fields == {"name": "accents before the comment", "sizes": "a default over lines", "plain": ""}


@pytest.fixture
def no_wait_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither wait variable set, and none remembered as set by dlnotes; teardown restores whatever was there."""
    for name in launch.WAIT_VARIABLES:
        monkeypatch.setenv(name, "")  # remembers the value before, so teardown restores what the test sets
        monkeypatch.delenv(name)
    monkeypatch.setattr(launch, "_chosen_here", set())


@pytest.mark.usefixtures("no_wait_settings")
@pytest.mark.parametrize("others, expected", [(0, {"GOMP_SPINCOUNT": launch.SPIN_COUNT}),
                                              (1, {"OMP_WAIT_POLICY": "PASSIVE"})])
def test_idle_threads_spin_briefly_alone_and_sleep_beside_other_jobs(others: int, expected: dict,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "other_runnable_processes", lambda: others)
    launch.quiet_idle_threads()
    assert {k: os.environ.get(k) for k in expected} == expected
    assert len(set(launch.WAIT_VARIABLES) & set(os.environ)) == 1


@pytest.mark.usefixtures("no_wait_settings")
def test_an_explicit_wait_policy_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.setattr(launch, "other_runnable_processes", lambda: 0)
    launch.quiet_idle_threads()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE" and "GOMP_SPINCOUNT" not in os.environ


def test_runnable_processes_are_counted_without_this_one() -> None:
    count = launch.other_runnable_processes(samples=3, interval_s=0.001)
    assert count >= 0 if Path("/proc/loadavg").is_file() else count == 1.0


@pytest.mark.usefixtures("no_wait_settings")
@pytest.mark.parametrize("others, expected", [(0, ("GOMP_SPINCOUNT", launch.SERVE_SPIN_COUNT)),
                                              (2, ("OMP_WAIT_POLICY", "PASSIVE"))])
def test_a_serving_process_spins_its_idle_threads_on_a_quiet_machine(others: int, expected: tuple[str, str],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "other_runnable_processes", lambda: 0)
    launch.quiet_idle_threads()  # the CLI's choice on a quiet machine: spin for a few rounds
    monkeypatch.setattr(launch, "other_runnable_processes", lambda: others)
    launch.serving_idle_threads()  # then the server's, replacing it
    assert {name: os.environ[name] for name in launch.WAIT_VARIABLES if name in os.environ} == dict([expected])


@pytest.mark.usefixtures("no_wait_settings")
def test_a_serving_process_keeps_the_users_wait_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOMP_SPINCOUNT", "500")  # the user's
    launch.serving_idle_threads()
    assert os.environ["GOMP_SPINCOUNT"] == "500" and "OMP_WAIT_POLICY" not in os.environ


@pytest.mark.usefixtures("no_wait_settings")
def test_a_bench_worker_chooses_its_own_wait_and_keeps_the_users(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`dlnotes bench` chose at its start; each worker looks again (and a serving one chooses differently): the
    choice made here does not reach it, a setting the user made does."""
    from dlnotes import bench, catalog

    monkeypatch.setattr(launch, "other_runnable_processes", lambda: 0)
    launch.quiet_idle_threads()
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's
    environments: list[dict] = []
    monkeypatch.setattr(bench.subprocess, "run", lambda command, **kw: environments.append(kw["env"]) or
                        type("Done", (), {"returncode": 1})())
    bench.run_worker(catalog.get("mlp"), "cpu", tmp_path, 1)
    assert os.environ["GOMP_SPINCOUNT"] == launch.SPIN_COUNT  # this process keeps its own choice
    assert "GOMP_SPINCOUNT" not in environments[0] and environments[0]["OMP_WAIT_POLICY"] == "ACTIVE"


@pytest.mark.parametrize("argv, samples", [(["dlnotes", "run", "mlp"], 1), (["dlnotes", "show", "mlp"], 0),
                                           (["dlnotes", "--help"], 0), (["dlnotes"], 0)])
def test_only_commands_that_start_torch_look_at_the_machine(argv: list[str], samples: int,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from dlnotes import cli

    calls = []
    monkeypatch.setattr(cli, "quiet_idle_threads", lambda: calls.append(1))
    monkeypatch.setattr(cli, "app", lambda: None)
    monkeypatch.setattr("sys.argv", argv)
    cli.main()
    assert len(calls) == samples
