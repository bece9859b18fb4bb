"""integrations.hf: the Trainer callback drives PID on a tiny randomly initialized GPT-2, and resumes from a checkpoint."""
from __future__ import annotations

import json

import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils.data import Dataset

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from controllers import make_controller  # noqa: E402
from dyndrop import UserError  # noqa: E402
from integrations import DropoutKnob, TensorRateDropout  # noqa: E402
from integrations.hf import DynamicDropoutCallback  # noqa: E402
from test_integrations import PID, assert_rates_reach_the_model, one_line, random_text, tiny_gpt2  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The cores are shared: one thread each (tests/conftest.py gives the module's setting back afterwards)."""
    torch.set_num_threads(1)


class Windows(Dataset):
    def __init__(self, data: torch.Tensor, stride: int, limit: int = 0) -> None:
        rows = data.unfold(0, 16, stride)
        self.rows = rows[:limit] if limit else rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


class Recorder(transformers.TrainerCallback):
    """Runs after the dropout callback: notes its rates when training starts and after each evaluation."""

    def __init__(self, dropout: DynamicDropoutCallback) -> None:
        self.dropout, self.at_start, self.rates = dropout, None, {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.at_start = self.dropout.scheduler.rates

    def on_evaluate(self, args, state, control, **kwargs):
        self.rates[state.global_step] = self.dropout.scheduler.rates  # once per eval dataset: the last one stays


def trainer_with(callback: DynamicDropoutCallback, out, eval_sets: str = "train+val", **overrides):
    data = random_text()
    val = Windows(data[3000:], 16, 8)
    eval_dataset = {"train": Windows(data[:3000], 16, 8), "val": val} if eval_sets == "train+val" else val
    args = dict(output_dir=str(out), max_steps=8, per_device_train_batch_size=4, per_device_eval_batch_size=8,
                learning_rate=3e-3, lr_scheduler_type="constant", eval_strategy="steps", eval_steps=2,
                logging_steps=2, save_strategy="steps", save_steps=4, report_to="none", use_cpu=True, seed=0,
                dataloader_num_workers=0, disable_tqdm=True)
    recorder = Recorder(callback)
    trainer = transformers.Trainer(model=tiny_gpt2(seed=7), args=transformers.TrainingArguments(**(args | overrides)),
                                   train_dataset=Windows(data[:3000], 1), eval_dataset=eval_dataset,
                                   callbacks=[callback, recorder])
    return trainer, recorder


def test_trainer_callback_drives_pid_and_resumes_from_a_checkpoint(tmp_path):
    callback = DynamicDropoutCallback(PID, val_metric="eval_val_loss", train_metric="eval_train_loss")
    trainer, recorder = trainer_with(callback, tmp_path)
    trainer.train()
    steps, rates = zip(*recorder.rates.items())
    assert steps == (2, 4, 6, 8) and len(set(rates)) == 4, "PID set a new rate at every evaluation"
    assert_rates_reach_the_model(trainer.model, callback.scheduler.rates)
    tracker = callback.scheduler.tracker
    logged = {k: v for record in trainer.state.log_history for k, v in record.items()}
    assert (tracker.eval_val_loss, tracker.eval_train_loss) == (logged["eval_val_loss"], logged["eval_train_loss"])
    assert tracker.eval_iter == 8 and tracker.ema_steps == 8, "the losses of every evaluation and log reached it"
    saved = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    saved = saved["stateful_callbacks"]["DynamicDropoutCallback"]
    assert saved["args"]["controller"] == PID and saved["attributes"]["scheduler_state"]["rates"] == list(rates[1])

    resumed = DynamicDropoutCallback(PID, val_metric="eval_val_loss", train_metric="eval_train_loss")
    trainer2, recorder2 = trainer_with(resumed, tmp_path)
    trainer2.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert recorder2.at_start == rates[1], "the controller's rate of step 4 is back on the model"
    assert recorder2.rates == {6: rates[2], 8: rates[3]}
    assert resumed.scheduler.state_dict() == callback.scheduler.state_dict()


class GraphCounter(transformers.TrainerCallback):
    """Notes how many graphs torch.compile has built at each evaluation."""

    def __init__(self) -> None:
        self.graphs: dict[int, int] = {}

    def on_evaluate(self, args, state, control, **kwargs):
        self.graphs[state.global_step] = counters["stats"]["unique_graphs"]


@pytest.mark.slow
def test_compiled_trainer_gets_tensor_rates_and_at_most_one_recompile(tmp_path):
    """With ``torch_compile`` the callback swaps in tensor-rate dropout: PID changes the rate at every evaluation,
    and the run compiles at most one graph after the first evaluation (the rate leaving 0)."""
    torch._dynamo.reset()
    counters.clear()
    callback = DynamicDropoutCallback(PID, val_metric="eval_val_loss", train_metric="eval_train_loss")
    trainer, recorder = trainer_with(callback, tmp_path, max_steps=10, save_strategy="no", torch_compile=True,
                                     torch_compile_backend="aot_eager")  # dynamo's guards decide recompiles
    graphs = GraphCounter()
    trainer.add_callback(graphs)
    trainer.train()
    assert len(set(recorder.rates.values())) == 5
    knob = DropoutKnob(trainer.model)
    assert all(isinstance(s.module, TensorRateDropout) for s in knob.sites)
    assert trainer.model.config._attn_implementation == "dyndrop_sdpa"
    assert graphs.graphs[10] - graphs.graphs[2] <= 1, graphs.graphs
    assert_rates_reach_the_model(trainer.model, callback.scheduler.rates)


@pytest.mark.parametrize("kwargs, message", [
    ({"controller": "pidd"}, "unknown controller 'pidd'"),
    ({"controller": "pid:kp=fast"}, "not a valid float"),
    ({"controller": make_controller("pid")}, "spec string"),
    ({"val_metric": "loss"}, "not an evaluation metric"),
    ({"train_metric": "train_loss"}, "not an evaluation metric"),
    ({"tensor_rates": "yes"}, "tensor_rates"),
])
def test_trainer_callback_argument_errors_are_one_line(kwargs, message):
    with pytest.raises(UserError) as e:
        DynamicDropoutCallback(**kwargs)
    assert message in one_line(e)


def test_trainer_callback_names_a_missing_metric(tmp_path):
    callback = DynamicDropoutCallback("pid", val_metric="eval_val_loss")
    trainer, _ = trainer_with(callback, tmp_path, eval_sets="val", save_strategy="no")
    with pytest.raises(UserError) as e:
        trainer.train()
    assert "hold none of eval_val_loss" in one_line(e)
