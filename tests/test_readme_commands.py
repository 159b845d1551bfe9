"""The shell commands in README.md are ones the tools accept, and what the README says is where things are is true.

Every ``jaxpeft ...`` line (in the command table and in the ``bash`` blocks) parses with the CLI's own parser and
has its required options; an ``export --best`` follows, in the same place, a ``train`` of that run that can rank
its checkpoints (``--metric-for-best-model`` and an ``--eval-file``); ``python -m jaxpeft.assets`` lines name
assets that exist.
"""

import pathlib
import re
import shlex

import pytest

from jaxpeft import assets, cli, demo

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def bash_blocks() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    return [block.replace("\\\n", " ") for block in blocks]


def table_commands() -> list[str]:
    return re.findall(r"^\| `(jaxpeft [^`]+)` \|", README, flags=re.M)


def commands_in(text: str, program: str) -> list[list[str]]:
    """The argument lists of the lines of ``text`` that run ``program`` (comments dropped)."""
    found = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if words[:len(program.split())] == program.split():
            found.append(words[len(program.split()):])
    return found


def places() -> list[list[list[str]]]:
    """The ``jaxpeft`` commands of each place in the README that shows some: the table, then each bash block."""
    table = [shlex.split(command)[1:] for command in table_commands()]
    return [table] + [commands_in(block, "jaxpeft") for block in bash_blocks()]


def option(arguments: list[str], flag: str) -> str | None:
    return arguments[arguments.index(flag) + 1] if flag in arguments else None


def test_the_readme_shows_commands():
    assert len(table_commands()) == 5
    assert {arguments[0] for place in places() for arguments in place} == {"train", "eval", "generate", "merge",
                                                                           "export"}


@pytest.mark.parametrize("arguments", [arguments for place in places() for arguments in place],
                         ids=lambda arguments: " ".join(arguments[:3]))
def test_each_jaxpeft_command_parses_with_its_required_options(arguments):
    parser, commands = cli.build_parser()
    namespace = parser.parse_args(arguments)
    commands[arguments[0]].options(namespace)  # raises UsageError on a missing required option


def test_export_best_follows_a_train_that_ranks_checkpoints():
    exports = 0
    for place in places():
        trains = {option(arguments, "--output-dir"): arguments for arguments in place if arguments[0] == "train"}
        for arguments in place:
            if arguments[0] == "export" and "--best" in arguments:
                exports += 1
                train = trains.get(option(arguments, "--run"))
                assert train is not None, f"export --best of a run the README does not train: {arguments}"
                assert "--metric-for-best-model" in train and "--eval-file" in train, train
    assert exports == 2  # the table's and the worked example's


def test_asset_commands_name_assets():
    listed = [arguments for block in bash_blocks() for arguments in commands_in(block, "python -m jaxpeft.assets")]
    substituted = re.findall(r"\$\(python -m jaxpeft\.assets (\S+)\)", README)
    names = [arguments[0] for arguments in listed if arguments and not arguments[0].startswith("-")] + substituted
    assert "minilm" in names and set(names) <= set(assets.ASSET_PATHS)
    assert "--write-rotten-tomatoes" in {word for arguments in listed for word in arguments}


def test_the_readme_names_the_demo_output_folder_and_every_notebook():
    output_dir = demo._parser().get_default("output_dir")
    assert f"`{output_dir}/sentiment/`" in README and f"`{output_dir}/causal_lm/`" in README
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        assert f"`{notebook.name}`" in README, f"README.md does not mention notebooks/{notebook.name}"
