"""Every command's options: help text, defaults shown once, one definition per shared option,
fine-tuning's defaults the same from Python and from the command line, the README's commands
parse, and no import cycles (the command modules and the dispatcher included)."""

from __future__ import annotations

import argparse
import ast
import json
import shlex
from pathlib import Path

import pytest

from w2v2 import cli
from w2v2.commands._options import HelpFormatter

ROOT = Path(__file__).resolve().parents[1]

# Options whose name several commands use for different things: the commands that share each
# definition. Every other option must be defined identically wherever it appears.
DIFFERENT = {
    "--out": [{"pretrain"}, {"finetune"}, {"evaluate"}, {"plot"}],  # run directory, errors TSV, PNG folder
    "--init": [{"pretrain"}, {"finetune"}],  # a model with a quantizer / any model or random:PRESET
    "--data": [{"evaluate"}, {"probe"}],  # manifests to score / one manifest to split
    "--train": [{"finetune"}, {"probe"}],  # manifests with transcripts / one labelled manifest
    "--case": [{"finetune"}, {"evaluate"}, {"lm"}],  # transcripts / scoring (None: the model's) / LM words
    "--seed": [{"pretrain", "finetune"}, {"probe"}],  # training / the probe's split and folds
    "--precision": [{"transcribe", "align", "evaluate", "serve"}, {"pretrain", "finetune"}],  # inference / training
    "--batch-size": [{"transcribe", "align", "evaluate", "serve"}, {"embed", "probe"}],  # chunks across files / files
    "--format": [{"transcribe"}, {"align"}, {"embed"}],  # writers (txt / json by default) / tensor files
    "-f": [{"transcribe"}, {"align"}],
    "--output-dir": [{"transcribe", "align"}, {"embed"}],  # outputs per input / one file per input, required
}


def parsers() -> dict[str, argparse.ArgumentParser]:
    return {name: cli.command_parser(name) for name in cli.COMMANDS}


def options(parser: argparse.ArgumentParser):
    """(action, is a pretraining override) for every documented option of ``parser``."""
    for group in parser._action_groups:
        override = group.title.startswith("overrides")
        for action in group._group_actions:
            if action.option_strings and action.help is not argparse.SUPPRESS and action.dest != "help":
                yield action, override


def shown_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    return parser._get_formatter()._expand_help(action)


def test_every_option_has_help_and_shows_its_default_at_most_once():
    for name, parser in parsers().items():
        assert parser.format_help()  # every help string formats (no stray %)
        for action in parser._actions:
            assert action.help, f"w2v2 {name} {action.metavar or action.dest}: no help"
        for action, _ in options(parser):
            where = f"w2v2 {name} {action.option_strings[0]}"
            text = shown_help(parser, action)
            assert action.help and action.help.strip(), f"{where}: no help"
            assert text.lower().count("default") <= 1, f"{where}: default shown twice: {text}"
            if action.required:
                assert "default" not in text.lower(), f"{where}: a required option shows a default: {text}"
            if action.default is not None and action.nargs != 0 and not action.required:
                assert "(default: " in text, f"{where}: the default {action.default!r} is not shown: {text}"


def definition(action: argparse.Action) -> dict:
    return {"names": tuple(action.option_strings), "dest": action.dest, "choices": action.choices,
            "type": action.type, "nargs": action.nargs, "help": action.help, "action": type(action).__name__}


def test_shared_options_have_one_definition():
    seen: dict[str, dict[str, tuple[dict, object, bool]]] = {}
    for name, parser in parsers().items():
        for action, override in options(parser):
            for flag in action.option_strings:
                seen.setdefault(flag, {})[name] = (definition(action), action.default, override)
    shared = {flag: by_command for flag, by_command in seen.items() if len(by_command) > 1}
    assert {"--model", "--device", "--precision", "--progress", "--lm", "--beam-width"} <= set(shared)
    for flag, by_command in shared.items():
        groups = DIFFERENT.get(flag, [set(by_command)])
        assert set().union(*groups) == set(by_command), f"{flag}: used by {sorted(by_command)}, declared {groups}"
        for group in groups:
            first = sorted(group)[0]
            for command in group:
                (spec, default, override), (spec0, default0, override0) = by_command[command], by_command[first]
                assert spec == spec0, f"{flag}: w2v2 {command} and w2v2 {first} define it differently"
                if override or override0:  # pretraining's flags override its preset: no default of their own
                    assert default is None if override else default0 is None, f"{flag} in w2v2 pretrain"
                else:
                    assert default == default0, f"{flag}: default {default!r} in {command}, {default0!r} in {first}"


def test_device_and_precision_resolve_at_run_time():
    for name, parser in parsers().items():
        for action, override in options(parser):
            if action.dest == "device":
                assert action.default == (None if override else "auto"), name
            if action.dest == "precision" and name in ("transcribe", "align", "evaluate"):
                assert action.default == "auto", name


def test_beam_is_a_hidden_alias_of_beam_width():
    parser = cli.command_parser("evaluate")
    assert parser.parse_args(["--data", "m.tsv", "--beam", "4"]).beam_width == 4
    assert parser.parse_args(["--data", "m.tsv", "--beam-width", "5"]).beam_width == 5
    assert "--beam " not in parser.format_help() and "--beam-width" in parser.format_help()


def test_integer_flags_take_scientific_notation_and_refuse_fractions(capsys):
    parser = cli.command_parser("finetune")
    required = ["--init", "random:tiny", "--train", "t", "--valid", "v", "--out", "o"]
    assert parser.parse_args(required + ["--max-tokens", "3.2e6"]).max_tokens == 3_200_000
    with pytest.raises(SystemExit) as e:
        parser.parse_args(required + ["--max-updates", "10.5"])
    assert e.value.code == 2 and "expected an integer, got '10.5'" in capsys.readouterr().err


def test_case_keep_means_none():
    from w2v2.commands.finetune import configs

    parser = cli.command_parser("finetune")
    required = ["--init", "random:tiny", "--train", "t", "--valid", "v", "--out", "o"]
    assert configs(parser.parse_args(required))[0].case == "upper"
    assert configs(parser.parse_args(required + ["--case", "keep"]))[0].case is None


def test_bad_batch_options_are_refused_before_training():
    from w2v2.commands.finetune import configs
    from w2v2.config import ConfigError

    parser = cli.command_parser("finetune")
    required = ["--init", "random:tiny", "--train", "t", "--valid", "v", "--out", "o"]
    for bad in (["--max-batch-size", "0"], ["--max-tokens", "0"], ["--num-workers", "-1"]):
        with pytest.raises(ConfigError, match="max_tokens and max_batch_size must be >= 1"):
            configs(parser.parse_args(required + bad))


def test_pretrain_flags_override_only_when_given():
    from w2v2.commands.pretrain import _overrides

    parser = cli.command_parser("pretrain")
    assert _overrides(parser.parse_args(["d", "--out", "o"])) == {"train": {}, "data": {}}
    args = parser.parse_args(["d", "--out", "o", "--lr", "1e-3", "--no-progress", "--max-tokens", "1e5"])
    assert _overrides(args) == {"train": {"lr": 1e-3, "progress": False}, "data": {"max_tokens": 100_000}}


def test_python_finetune_defaults_equal_the_command_line(tmp_path, monkeypatch, data_dir):
    """``finetune()`` with no options trains exactly as ``w2v2 finetune`` with no flags."""
    from w2v2.finetune import finetune
    from w2v2.trainer import TrainConfig, Trainer

    clips = sorted((data_dir / "speechocean762-train" / "audio").glob("*.opus"))[:2]
    manifest = tmp_path / "m.tsv"
    manifest.write_text("path\tseconds\tspeaker\ttext\n" + "".join(f"{p}\t2\ts\tHELLO\n" for p in clips))
    seen = []

    def train(self, resume=False):  # what the run would train with, without training
        seen.append((type(self.cfg), self.cfg.to_dict(), self.loss_fn.cfg, self.model.config))
        return {"step": 0, "stopped_early": False, "checkpoint": None}

    monkeypatch.setattr(Trainer, "train", train)
    finetune("random:tiny", [str(manifest)], [str(manifest)], tmp_path / "py")
    assert cli.main(["finetune", "--init", "random:tiny", "--train", str(manifest), "--valid", str(manifest),
                     "--out", str(tmp_path / "cli")]) == 0
    (py_type, py_train, py_loss, py_model), (cli_type, cli_train, cli_loss, cli_model) = seen
    assert py_type is cli_type and py_train == cli_train and py_loss == cli_loss and py_model == cli_model
    assert (py_train["lr"], py_train["weight_decay"]) != (TrainConfig.lr, TrainConfig.weight_decay)
    py_json, cli_json = (json.loads((tmp_path / d / "finetune_config.json").read_text()) for d in ("py", "cli"))
    assert py_json == cli_json


def readme_commands() -> list[list[str]]:
    """The w2v2 command lines in the README's code blocks (continuation lines joined, comments dropped)."""
    shell, language = [], None
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            language = line[3:].strip() if language is None else None
        elif language in ("bash", "sh", ""):
            shell.append(line)
    lines = "\n".join(shell).replace("\\\n", " ").splitlines()
    out = []
    for line in lines:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
        starts = [0] + [i + 1 for i, t in enumerate(tokens) if t in ("&&", ";", "||")]
        for start, end in zip(starts, starts[1:] + [len(tokens) + 1]):
            words = tokens[start:end - 1]
            if len(words) > 1 and Path(words[0]).name == "w2v2":
                out.append(words[1:])
            elif words[:3] == ["python", "-m", "w2v2"]:
                out.append(words[3:])
    return out


def test_readme_commands_parse():
    commands = readme_commands()
    assert ["transcribe", "talk.mp4", "-f", "srt", "-o", "out/"] in commands  # the main job, verbatim
    for argv in commands:
        assert argv[0] in cli.COMMANDS, argv
        try:
            cli.command_parser(argv[0]).parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"the README's `w2v2 {shlex.join(argv)}` does not parse")


def test_help_of_every_command_renders(capsys):
    for name in cli.COMMANDS:
        with pytest.raises(SystemExit) as e:
            cli.main([name, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: w2v2 {name}") and "(default: None)" not in out


def imports(path: Path, module: str, modules: set[str]) -> set[str]:
    """The w2v2 modules ``module`` (at ``path``) imports anywhere in its body."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1] + [node.module or ""]).strip(".") \
                if node.level else node.module
            names = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            found |= set(names) if names else {base}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return (found & modules) - {module}


def test_no_import_cycles():
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (ROOT / "w2v2").rglob("*.py")}
    graph = {m: imports(p, m, set(files)) for m, p in files.items()}
    graph["w2v2.cli"] |= {m for m in files if m.startswith("w2v2.commands.")}  # loaded by name (importlib)
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, "import cycle: " + " -> ".join(path[path.index(n):] + [m, n]) \
                if n in path else f"import cycle through {m} -> {n}"
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_evaluate_without_model_uses_the_embedded_one_and_says_so(tmp_path, data_dir, capsys):
    from w2v2.checkpoint import default_model_notice

    notice = default_model_notice()
    if notice is None:
        pytest.skip("no default model embedded in this checkout")
    clip = data_dir / "speechocean762-train" / "audio" / "000010168.opus"
    manifest = tmp_path / "m.tsv"
    manifest.write_text(f"path\tseconds\tspeaker\ttext\n{clip}\t1.67\ts\tBye!\n")
    assert cli.main(["evaluate", "--data", str(manifest), "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert notice in err.splitlines() and "default" in out and "m.tsv" in out
    assert cli.main(["transcribe", str(clip), "--device", "cpu"]) == 0
    assert notice in capsys.readouterr().err.splitlines()  # the same line as transcribe's
