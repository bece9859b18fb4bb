"""integrations.lightning: the Callback drives PID on a tiny GPT-2 LightningModule, and resumes from a checkpoint."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

L = pytest.importorskip("lightning")

from controllers import make_controller  # noqa: E402
from dyndrop import UserError  # noqa: E402
from integrations.lightning import DynamicDropoutCallback  # noqa: E402
from test_integrations import PID, assert_rates_reach_the_model, one_line, random_text, tiny_gpt2  # noqa: E402

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
pytestmark = pytest.mark.filterwarnings("ignore:.*(LeafSpec|dirpath has changed|dataloader is not resumable)")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The cores are shared: one thread each (tests/conftest.py gives the module's setting back afterwards)."""
    torch.set_num_threads(1)


class TinyGPT2(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_gpt2(seed=7)

    def forward(self, x: torch.Tensor):
        return self.model(x)

    def loss(self, rows: torch.Tensor) -> torch.Tensor:
        logits = self.model(rows[:, :-1]).logits
        return F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())

    def training_step(self, rows, batch_idx):
        return self.loss(rows)

    def validation_step(self, rows, batch_idx, dataloader_idx=0):
        self.log(("val_loss", "train_eval_loss")[dataloader_idx], self.loss(rows), add_dataloader_idx=False)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


class Recorder(L.Callback):
    """Runs after the dropout callback: notes its rates and state when training starts and after each validation."""

    def __init__(self, dropout: DynamicDropoutCallback) -> None:
        self.dropout, self.at_start, self.rates, self.states = dropout, None, {}, {}

    def on_train_start(self, trainer, pl_module):
        self.at_start = copy.deepcopy(self.dropout.state_dict())

    def on_validation_end(self, trainer, pl_module):
        self.rates[trainer.global_step] = self.dropout.scheduler.rates
        self.states[trainer.global_step] = copy.deepcopy(self.dropout.state_dict())


def fit(callback: DynamicDropoutCallback, out, ckpt_path=None, max_steps: int = 8, two_loaders: bool = True):
    data = random_text()
    g = torch.Generator().manual_seed(0)
    train = DataLoader(data[:3000].unfold(0, 17, 1), batch_size=4, shuffle=True, generator=g)
    val = [data[3000:].unfold(0, 17, 16)[:8], data[:3000].unfold(0, 17, 16)[:8]][:2 if two_loaders else 1]
    recorder = Recorder(callback)
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=out, save_top_k=-1, filename="{step}",
                                                      save_on_train_epoch_end=False)  # at every validation's end
    trainer = L.Trainer(max_steps=max_steps, val_check_interval=2, check_val_every_n_epoch=None,
                        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[callback, recorder, checkpoints])
    module = TinyGPT2()
    L.seed_everything(0, verbose=False)
    trainer.fit(module, train, [DataLoader(v, batch_size=8) for v in val], ckpt_path=ckpt_path)
    return module, recorder


def test_lightning_callback_drives_pid_and_resumes_from_a_checkpoint(tmp_path):
    callback = DynamicDropoutCallback(PID, val_metric="val_loss", train_metric="train_eval_loss")
    module, recorder = fit(callback, tmp_path)
    steps, rates = zip(*recorder.rates.items())
    assert steps == (2, 4, 6, 8) and len(set(rates)) == 4, "PID set a new rate at every validation"
    assert_rates_reach_the_model(module, callback.scheduler.rates)
    tracker = callback.scheduler.tracker
    assert tracker.eval_iter == 8 and tracker.ema_steps == 8 and tracker.eval_train_loss != tracker.train_loss_smoothed

    resumed = DynamicDropoutCallback(PID, val_metric="val_loss", train_metric="train_eval_loss")
    resumed_module, recorder2 = fit(resumed, tmp_path / "resumed", ckpt_path=tmp_path / "step=4.ckpt")
    assert recorder2.at_start == recorder.states[4], "the controller state of step 4 is back, intact"
    assert list(recorder2.rates) == [6, 8] and len({rates[1], *recorder2.rates.values()}) == 3
    assert_rates_reach_the_model(resumed_module, resumed.scheduler.rates)
    # Lightning restores neither the batches' order (a plain DataLoader) nor the RNG of dropout's masks, so the
    # losses after step 4 differ from the first run's; the controller continued from its state all the same.


@pytest.mark.parametrize("kwargs, message", [
    ({"controller": "pidd"}, "unknown controller 'pidd'"),
    ({"controller": make_controller("pid")}, "spec string"),
    ({"val_metric": None}, "val_metric=None"),
    ({"train_metric": ""}, "train_metric=''"),
    ({"tensor_rates": None}, "tensor_rates"),
])
def test_lightning_callback_argument_errors_are_one_line(kwargs, message):
    with pytest.raises(UserError) as e:
        DynamicDropoutCallback(**kwargs)
    assert message in one_line(e)


def test_lightning_callback_names_a_missing_metric(tmp_path):
    callback = DynamicDropoutCallback("pid", val_metric="val_loss", train_metric="train_loss_no_dropout")
    with pytest.raises(UserError) as e:
        fit(callback, tmp_path, two_loaders=False)
    assert "'train_loss_no_dropout' is not among the logged metrics (val_loss)" in one_line(e)
