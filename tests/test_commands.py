"""The commands layer: each command has exactly its own flags, one spelling (underscores), one
error path (one sentence, exit 2; `--debug` adds the traceback), and validates its config as
`train` does."""

import re
import subprocess
import sys

import pytest

from big_contrast import cli
from test_train import REPO, env

DISTRIBUTED = {"coordinator", "num_processes", "process_id", "distributed_timeout"}
FLAGS = {
    "train": {"config", "workdir", "plot"} | DISTRIBUTED,
    "eval": {"config", "workdir", "step", "json", "benchmarks", "data_dir"} | DISTRIBUTED,
    "plan": {"config", "device_memory_gb"},
    "data convert": {"examples_per_shard", "csv_img_key", "csv_caption_key", "json_caption_key", "overwrite",
                     "runner", "workers"},
    "data train-tokenizer": {"vocab_size", "output", "keep_case", "max_captions", "model_type", "split",
                             "data_dir", "image_key", "caption_key"},
    "import": {"workdir", "arch", "tokenizer"},
    "export": {"workdir", "to", "step", "config"},
}


def run(argv, capfd):
    code = cli.main(["big-contrast", *argv])
    out, err = capfd.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", sorted(FLAGS))
def test_each_commands_help_lists_exactly_its_own_flags(command, capfd):
    code, out, _ = run([*command.split(), "--help"], capfd)
    assert code == 0
    listed = set(re.findall(r"^  --(?:\[no\])?(\w+):", out, flags=re.MULTILINE))
    assert listed == FLAGS[command]
    assert out.startswith(f"big-contrast {command}:")


def test_a_flag_of_another_command_is_refused(capfd):
    code, _, err = run(["plan", "--config", str(REPO / "configs/demo.py"), "--step", "3"], capfd)
    assert code == 2 and err.strip() == "big-contrast plan: Unknown command line flag 'step'"


def test_a_misspelt_override_is_one_sentence_with_the_suggestion(tmp_path):
    result = subprocess.run([sys.executable, "-m", "big_contrast.cli", "train", "--config", "configs/demo.py",
                             "--config.batch_sise=3", "--workdir", str(tmp_path / "W")],
                            cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "big-contrast train: --config.batch_sise=3: the config has no field 'batch_sise' "
        '(did you mean "batch_size"?); check the key against the config file.']
    assert not (tmp_path / "W").exists()


def test_a_misspelt_nested_override_names_the_missing_field(capfd):
    code, _, err = run(["plan", "--config", str(REPO / "configs/demo.py"), "--config.model.imagee.width=3"], capfd)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--config.model.imagee.width=3: the config has no field 'imagee'" in err


def test_plan_validates_the_config_as_train_does(tmp_path, capfd):
    config = ["--config", str(REPO / "configs/siglip_b16.py"), "--config.batch_size=-5"]
    code, out, plan_err = run(["plan", *config], capfd)
    assert code == 2 and out == ""
    code, _, train_err = run(["train", *config, "--workdir", str(tmp_path / "W")], capfd)
    assert code == 2 and not (tmp_path / "W").exists()
    sentence = "config.batch_size=-5 must be a positive integer (the global batch)."
    assert plan_err.strip() == f"big-contrast plan: {sentence}"
    assert train_err.strip() == f"big-contrast train: {sentence}"


def test_debug_adds_the_traceback(capfd):
    code, _, err = run(["plan", "--config", str(REPO / "configs/demo.py"), "--config.batch_size=-5", "--debug"], capfd)
    assert code == 2 and "Traceback" in err and err.strip().endswith("must be a positive integer (the global batch).")


def test_the_data_commands_take_underscored_flags_and_name_a_dashed_one(tmp_path, capfd):
    output = tmp_path / "t.model"
    code, out, err = run(["data", "train-tokenizer", "demo", "--vocab_size", "40", "--max_captions", "300",
                          "--output", str(output)], capfd)
    assert code == 0 and output.exists() and "-piece sentencepiece model" in out, err
    code, _, err = run(["data", "train-tokenizer", "demo", "--vocab-size", "40", "--output", str(output)], capfd)
    assert code == 2
    assert err.strip() == ("big-contrast data train-tokenizer: --vocab-size is spelt --vocab_size "
                           "(flags use underscores).")
    code, _, err = run(["data", "convert", "a.tar", str(tmp_path / "o"), "--examples-per-shard=5"], capfd)
    assert code == 2 and "--examples-per-shard is spelt --examples_per_shard" in err
    assert not (tmp_path / "o").exists()


def test_eval_refuses_a_data_dir_without_benchmarks(tmp_path, capfd):
    code, _, err = run(["eval", "--workdir", str(tmp_path), "--data_dir", str(tmp_path)], capfd)
    assert code == 2 and "pass --benchmarks too" in err


def test_an_unknown_command_lists_the_commands(capfd):
    code, _, err = run(["trian"], capfd)
    assert code == 2 and "unknown command 'trian'" in err and "data convert" in err
