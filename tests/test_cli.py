"""The medmae command: stages listed, every subcommand shows an example, errors are one line."""

from __future__ import annotations

import pytest

from medmae.cli import COMMAND_MODULES, build_parser, main


def subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_help_lists_the_stages(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for name in ("demo", "manifest", "pretrain", "export"):
        assert name in text
    assert len(subcommands()) >= len(COMMAND_MODULES)


@pytest.mark.parametrize("command", subcommands())
def test_every_subcommand_help_shows_an_example(command: str, capsys: pytest.CaptureFixture) -> None:
    try:
        code = main([command, "--help"])
    except SystemExit as exit_:
        code = exit_.code
    assert code == 0
    assert "example" in capsys.readouterr().out.lower()


def test_bad_input_is_one_line_not_a_traceback(tmp_path, capsys: pytest.CaptureFixture) -> None:
    code = main(["export", str(tmp_path / "missing.ckpt"), "-o", str(tmp_path / "e.pt")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("medmae: error:") and "missing.ckpt" in err and "Traceback" not in err
