"""Each option once: every command-line option that fills a config field is built from that field
(:func:`embedcache.config.setting`), so its default, choices, flag and help cannot disagree with the config, its
checks or its messages."""

from __future__ import annotations

from dataclasses import fields

import click
import pytest

from embedcache import config
from embedcache.cli import main
from embedcache.cli.options import options
from embedcache.errors import UsageError

#: The config classes whose fields each command's options fill.
FILLS = {"encode": (config.EncodeConfig, config.PreprocessConfig), "finetune": (config.FinetuneConfig,),
         "score": (config.ScoreConfig, config.ProtocolSettings),
         "predict": (config.PredictConfig, config.ProtocolSettings), "phantom": (config.PhantomConfig,)}


def _settings(classes):
    return {f.name: f for cls in classes for f in fields(cls) if "help" in f.metadata}


@pytest.mark.parametrize("command", sorted(FILLS))
def test_every_option_of_a_config_field_is_that_fields_default_choices_flag_and_help(command):
    settings = _settings(FILLS[command])
    options = {p.name: p for p in main.commands[command].params if isinstance(p, click.Option)}
    filled = set(settings) & set(options)
    assert filled, command
    for name in sorted(filled):
        option, field, meta = options[name], settings[name], settings[name].metadata
        listed = isinstance(field.default, tuple)  # a comma list: its choices are checked by the config
        assert option.default == (",".join(field.default) if listed else field.default), (command, name)
        assert option.help == meta["help"], (command, name)
        assert (meta["flag"] or "--" + name.replace("_", "-")) in option.opts, (command, name, option.opts)
        if meta["choices"] is not None and not listed:
            assert tuple(option.type.choices) == tuple(meta["choices"]), (command, name)
        if listed:
            assert option.callback(None, option, option.default) == field.default, (command, name)
    # a setting of the command's configs that no option fills is one a person cannot set: say so here if meant
    unfilled = {"encode": set(), "finetune": set(), "score": set(), "predict": set(), "phantom": set()}[command]
    assert set(settings) - set(options) == unfilled, (command, sorted(set(settings) - set(options)))


def test_the_choice_lists_are_the_configs_own():
    score = {p.name: p for p in main.commands["score"].params}
    assert tuple(score["cases"].type.choices) == config.CASE_SETS
    assert score["prompts"].default == ",".join(config.DEFAULT_PROTOCOLS)
    predict = {p.name: p for p in main.commands["predict"].params}
    assert tuple(predict["prompts"].type.choices) == config.PROTOCOLS
    assert predict["streams"].type.max == config.MAX_STREAMS


def test_the_backbone_names_are_the_registrys():
    from embedcache.model.backbones import BACKBONES

    assert tuple(name for name in BACKBONES if name != "tiny") == config.BACKBONE_NAMES


@pytest.mark.parametrize("settings, flag", [(dict(margin_mm=-1), "--box-margin-mm"),
                                            (dict(margin_slices=99), "--box-margin-slices")])
def test_a_configs_message_names_the_flag_a_person_typed(settings, flag):
    with pytest.raises(UsageError, match=flag):
        config.ProtocolSettings(**settings)
    with pytest.raises(UsageError, match="--dtype"):
        config.EncodeConfig(embedding_dtype="int8")


def test_a_renamed_option_keeps_its_old_spelling_for_a_release(tmp_path, phantom_dir):
    """``--weights`` was ``--checkpoint`` (and score's ``--protocols`` was ``--prompts``): the old spelling still fills
    the field, with a note naming the new one, is hidden from --help, counts as typed, and both at once are refused."""
    from click.testing import CliRunner

    from embedcache.cli.options import typed

    run = lambda *args: CliRunner().invoke(main, [str(a) for a in args])  # noqa: E731
    missing = tmp_path / "nope.pth"
    old = run("encode", phantom_dir, "--out", tmp_path / "c.h5", "--model", "vit_b", "--checkpoint", missing)
    assert old.exit_code == 1 and f"{missing}: checkpoint not found" in old.output, old.output
    assert "note: --checkpoint is now --weights" in old.output
    both = run("encode", phantom_dir, "--out", tmp_path / "c.h5", "--weights", missing, "--checkpoint", missing)
    assert both.exit_code == 2 and "--checkpoint is the old spelling of --weights" in both.output, both.output
    assert not (tmp_path / "c.h5").exists()
    for command, new, gone in (("encode", "--weights", "--checkpoint"), ("score", "--protocols", "--prompts"),
                               ("predict", "--protocol", "--prompts"), ("finetune", "--amp", "--precision"),
                               ("encode", "--encoder-precision", "--precision"), ("export", "--weights", "--checkpoint"),
                               ("finetune", "--train-boxes", "--train-prompts")):
        shown = run(command, "--help").output
        assert new in shown and f"{gone} " not in shown.replace(f"{gone}/", ""), (command, gone)

    @click.command()
    @options(config.FinetuneConfig, "precision")
    def probe(precision):
        click.echo(f"{precision} {sorted(typed())}")

    said = CliRunner().invoke(probe, ["--precision", "fp16"])
    assert said.exit_code == 0 and said.output.splitlines()[-1] == "fp16 ['precision']", said.output


@pytest.mark.parametrize("cls, settings, flag", [
    (config.FinetuneConfig, dict(rounds=1), "--rounds"), (config.FinetuneConfig, dict(round_loss="first"), "--round-loss"),
    (config.ProtocolSettings, dict(refine="spread"), "--refine"), (config.ProtocolSettings, dict(reach=-1), "--reach"),
    (config.ProtocolSettings, dict(reach=True), "--reach")])
def test_the_click_settings_refuse_what_does_not_fit_naming_their_flag(cls, settings, flag):
    with pytest.raises(UsageError, match=flag):
        cls(**settings)


def test_a_bad_click_option_on_the_command_line_is_one_line(small_cache, tmp_path):
    from conftest import cli, one_line

    one_line(cli("score", small_cache, "--out", tmp_path / "r", "--refine", "spread"), "--refine", code=2)
    one_line(cli("finetune", small_cache, "--out", tmp_path / "run", "--prompts", "interactive", "--rounds", "1"),
             "--rounds", code=2)
    one_line(cli("score", small_cache, "--out", tmp_path / "r", "--reach", "99"), "--reach", code=2)
