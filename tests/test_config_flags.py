"""contracts/config_flags.py: flags generated from config dataclasses, and the CLIs built on it (livetower serve /
train / up / archive, bench load, bench replay): no flags gives the dataclass defaults, every help shows them."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from contracts.config_flags import Flag, FlagValueError, config_from_args, field_docs, flag_set, given_argv

MODES = ("fast", "slow")


@dataclass(kw_only=True, frozen=True, slots=True)
class Knobs:
    """A docstring is not a field's documentation."""

    # a section comment: not a field's either
    size: int = 4              # how many knobs
                               # (continued at a deeper column)
    rate: float = 0.5          # turns per second (50% duty)
    # a comment at the fields' column ends rate's documentation
    name: str = "x"
    label: str | None = None   # optional label
    where: Path | None = None  # optional directory
    verbose: bool = False      # say more
    color: bool = True         # use colours
    shape: tuple[int, int] = field(default=(1, 2), metadata={"doc": "width x height"})  # metadata wins
    mode: str = "fast"         # one of MODES

    def __post_init__(self) -> None:
        inner: int = 3  # a method's annotated local is no field
        if self.size < inner - 2:
            raise ValueError(f"Knobs.size must be >= 1, got {self.size}")


def _shape(text: str) -> tuple[int, int]:
    w, h = text.split("x")
    return int(w), int(h)


KNOB_FLAGS = ("size", "rate", "label", "where", "verbose", "color", Flag("shape", parse=_shape, note="WxH"),
              Flag("mode", choices=MODES))


def knobs(argv: list[str], *specs, **kw) -> Knobs:
    flags = flag_set(Knobs, *(specs or KNOB_FLAGS))
    p = argparse.ArgumentParser()
    flags.add_to(p)
    return config_from_args(flags, p.parse_args(argv), **kw)


def test_docs_from_trailing_comments_continuations_and_metadata():
    assert field_docs(Knobs) == {
        "size": "how many knobs (continued at a deeper column)",
        "rate": "turns per second (50% duty)",
        "label": "optional label",
        "where": "optional directory",
        "verbose": "say more",
        "color": "use colours",
        "shape": "width x height",
        "mode": "one of MODES",
    }
    with pytest.raises(ValueError, match=r"Knobs\.name has no documentation"):
        flag_set(Knobs, "name")


def test_no_flags_is_the_default_instance_and_help_shows_the_defaults():
    assert knobs([]) == Knobs()
    flags = flag_set(Knobs, *KNOB_FLAGS)
    p = argparse.ArgumentParser()
    helps = {a.option_strings[0]: a.help for a in flags.add_to(p)}
    assert helps["--size"] == "how many knobs (continued at a deeper column) (default: 4)"
    assert helps["--rate"] == "turns per second (50%% duty) (default: 0.5)"  # argparse %-formats help
    assert helps["--shape"] == "width x height; WxH (default: (1, 2))"
    assert "turns per second (50% duty)" in p.format_help()


def test_values_bools_none_and_choices():
    got = knobs(["--size", "7", "--rate", "2", "--label", "a", "--where", "d", "--verbose", "--no-color",
                 "--shape", "3x4", "--mode", "slow"])
    assert got == Knobs(size=7, rate=2.0, label="a", where=Path("d"), verbose=True, color=False, shape=(3, 4),
                        mode="slow")
    assert knobs(["--color"]).color is True and knobs([]).label is None and knobs([]).where is None
    quiet = flag_set(Knobs, Flag("verbose", name="quiet", negate=True))
    p = argparse.ArgumentParser()
    quiet.add_to(p)
    assert config_from_args(quiet, p.parse_args(["--quiet"]), Knobs(verbose=True)).verbose is False
    with pytest.raises(SystemExit):
        knobs(["--mode", "medium"])


def test_base_fixed_prefix_and_conversions():
    base = Knobs(size=9, label="base")
    assert knobs(["--rate", "1"], base=base) == Knobs(size=9, label="base", rate=1.0)  # the base's, not the class's
    assert knobs([], label="fixed") == Knobs(label="fixed")
    flags = flag_set(Knobs, "size", Flag("rate", name="period-ms", to_field=lambda ms: 1e3 / ms,
                                         shown=lambda r: 1e3 / r), prefix="knob-")
    p = argparse.ArgumentParser()
    helps = {a.option_strings[0]: a.help for a in flags.add_to(p)}
    assert set(helps) == {"--knob-size", "--period-ms"} and "(default: 2000.0)" in helps["--period-ms"]
    assert config_from_args(flags, p.parse_args(["--knob-size", "2", "--period-ms", "250"])) == Knobs(size=2, rate=4.0)


def test_a_bad_value_names_the_field():
    with pytest.raises(ValueError, match=r"Knobs\.size must be >= 1") as e:
        knobs(["--size", "0"])
    assert isinstance(e.value, FlagValueError)
    with pytest.raises(TypeError, match="needs Flag"):
        flag_set(Knobs, "shape")


def test_given_argv_writes_the_given_flags_back():
    flags = flag_set(Knobs, "size", "label", "verbose", "color")
    p = argparse.ArgumentParser()
    actions = flags.add_to(p)
    assert given_argv(actions, p.parse_args([])) == []
    argv = ["--no-color", "--label", "a b", "--verbose", "--size", "3"]
    again = given_argv(actions, p.parse_args(argv))
    assert sorted(again) == sorted(argv) and p.parse_args(again) == p.parse_args(argv)


# ---------------------------------------------------------------- the real command lines

def _help(main, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return capsys.readouterr().out


def _expected_default(flags, spec: Flag):
    if flags.defaults is not None:
        value = getattr(flags.defaults, spec.field)
    else:
        f = {f.name: f for f in dataclasses.fields(flags.cls)}[spec.field]
        value = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
    return spec.shown(value) if spec.shown else value


def _check_helps(flag_sets, help_text: str) -> int:
    squeezed = "".join(help_text.split())  # argparse wraps lines, also after hyphens
    n = 0
    for flags in flag_sets:
        for bound, action in zip(flags.flags, flags.add_to(argparse.ArgumentParser())):
            assert f"(default: {_expected_default(flags, bound.spec)})" in action.help, action.help
            assert "".join(action.help.replace("%%", "%").split()) in squeezed, bound.option
            n += 1
    return n


def test_livetower_serve_train_up_defaults_are_the_dataclasses(capsys):
    from livetower import cli, cli_flags
    from server.config import ServerConfig
    from trainer.config import TrainConfig

    p = cli.build_parser()
    server = ServerConfig(data_dir=cli.DEFAULT_DATA_DIR)
    train = TrainConfig(inductor_cache_dir=cli.DEFAULT_DATA_DIR / "inductor-cache")
    assert cli_flags.server_config(p.parse_args(["serve"])) == server
    assert cli_flags.train_config(p.parse_args(["train"])) == train
    up = p.parse_args(["up"])
    assert cli_flags.server_config(up) == server and cli_flags.train_config(up) == train
    assert cli_flags.trainer_argv(up) == []
    tiny = cli_flags.train_config(p.parse_args(["train", "--tiny"]))
    assert tiny == TrainConfig.tiny_debug(inductor_cache_dir=cli.DEFAULT_DATA_DIR / "inductor-cache")

    server_sets, train_sets = cli_flags.server_flag_sets(), (*cli_flags.train_flag_sets(), cli_flags.priority_flags())
    tracing = cli_flags.tracing_flags()  # serve, train and up each take it once
    assert _check_helps((*server_sets, tracing), _help(cli.main, ["serve"], capsys)) == 53
    assert _check_helps((*train_sets, tracing), _help(cli.main, ["train"], capsys)) == 36
    assert _check_helps((*server_sets, *train_sets, tracing), _help(cli.main, ["up"], capsys)) == 81


def test_livetower_flags_keep_their_meaning():
    from livetower import cli, cli_flags

    p = cli.build_parser()
    s = cli_flags.server_config(p.parse_args(["serve", "--metrics-port", "-1", "--gil-switch-interval-ms", "2.5",
                                         "--threads", "3", "--rollout-follower", "--no-ann", "--no-batching",
                                         "--no-uvloop", "--no-gc-freeze", "--reuse-port"]))
    assert s.metrics_port is None and s.gil_switch_interval_s == 0.0025 and s.engines.num_threads == 3
    assert not s.engines.leader and not s.engines.use_ann and s.batching is None
    assert not s.uvloop and not s.gc_freeze and s.reuse_port
    assert cli_flags.server_config(p.parse_args(["serve", "--max-batch", "8"])).batching.max_batch == 8
    t = cli_flags.train_config(p.parse_args(["train", "--tiny", "--epochs", "3", "--train-device", "cpu",
                                        "--max-workers", "2"]))
    assert t.epochs_per_round == 3 and t.elastic.device == "cpu" and t.elastic.max_workers == 2
    assert t.model == cli_flags.train_config(p.parse_args(["train", "--tiny"])).model  # --tiny's base, not the default's


def test_up_hands_the_train_flags_to_its_sidecar():
    from livetower import cli, cli_flags

    p = cli.build_parser()
    up = p.parse_args(["up", "--tiny", "--epochs", "3", "--port", "5", "--no-ann", "--events", "kafka://h:1/t",
                       "--trainer-metrics-port", "-1", "--train-device", "cpu", "--round-interval-s", "0.5"])
    argv = cli_flags.trainer_argv(up)
    assert "--port" not in argv and "--no-ann" not in argv  # server flags stay with the server
    train = p.parse_args(["train", *argv])
    assert cli_flags.train_config(train) == cli_flags.train_config(up)
    assert (train.events, train.trainer_metrics_port) == ("kafka://h:1/t", -1)


def test_livetower_reports_a_bad_flag_value(capsys):
    from livetower import cli

    assert cli.main(["serve", "--max-batch", "0"]) == 2
    assert "max_batch must be in 1..256" in capsys.readouterr().err
    assert cli.main(["up", "--min-workers", "3", "--max-workers", "2"]) == 2
    assert "ElasticConfig.max_workers" in capsys.readouterr().err


def test_commands_without_config_flags_do_not_import_torch():
    code = ("import sys; from livetower.cli import build_parser; "
            "build_parser().parse_args(['query', 'recommend', '--user', 'u']); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout
    assert out.strip() == "False"


def test_archive_load_and_replay_defaults_are_the_dataclasses(capsys):
    from benchmarks import loadgen, replay
    from livetower import cli, cli_archive
    from trainer.sources.archive import ArchiveConfig

    p = cli.build_parser()
    flags = cli_archive._archive_flags()
    assert config_from_args(flags, p.parse_args(["archive", "--table", "t"])) == ArchiveConfig()
    assert not config_from_args(flags, p.parse_args(["archive", "--table", "t", "--no-partition"])).partition_by_date
    assert _check_helps([flags], _help(cli.main, ["archive"], capsys)) == 3

    assert loadgen.config_from_args(loadgen.build_parser().parse_args(["--out", "o"])) == loadgen.LoadConfig(
        out=Path("o"))
    quiet = loadgen.config_from_args(loadgen.build_parser().parse_args(["--quiet", "--no-uvloop"]))
    assert not quiet.progress and not quiet.use_uvloop and quiet.out is not None
    n_flags = len(dataclasses.fields(loadgen.LoadConfig)) - 1  # every field but out
    assert _check_helps([loadgen._flags()], _help(loadgen.main, [], capsys)) == n_flags

    assert replay.config_from_args(replay.build_parser().parse_args([])) == replay.base_config(quick=False)
    quick = replay.config_from_args(replay.build_parser().parse_args(["--quick", "--speedup", "7"]))
    assert quick == dataclasses.replace(replay.base_config(quick=True), speedup=7.0)
    assert replay.base_config(quick=False) == replay.ReplayConfig() and replay.ReplayConfig().train.epochs_per_round == 2
    assert _check_helps(replay._flags(), _help(replay.main, [], capsys)) == 12
    with pytest.raises(SystemExit):
        replay.main(["--dataset", "ml-1m"])
    assert "ReplayConfig.dataset" in capsys.readouterr().err
