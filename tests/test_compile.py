"""torch.compile of the training step (``train.LossModule``: model + MeanFlow loss, the
JVP inside): compiled loss and gradients equal the eager ones for both JVP modes, and a
launcher run with ``compile=true loss=meanflow`` trains and writes an un-compiled checkpoint.

What dynamo makes of the step (torch 2.14, CPU, inductor with gcc), asserted below:
one graph with no break for either JVP mode, the model's layers and the JVP inside it.
Under compilation ``models/jvp.py`` runs ``torch.func.jvp`` (dynamo captures it; the
eager dual tensors it does not), the layers of ``models/layers.py`` use the built-in ops
(dynamo does not trace a custom ``jvp``), and ``separate`` runs as ``fused`` (its RNG
rewind, ``torch.get_rng_state``, would break the graph and leave the model eager).

The image models are checked at the dynamo level only (one graph, no break: cheap);
compiling one takes minutes on a 2-core CPU. The first compile in
a fresh inductor cache is the slow part (~30-60 s here); the graphs are cached on disk.
"""

import pytest
import torch
import torch._dynamo
import torch._inductor.config
from torch import nn

from dataloaders.base_dataloaders import make_base_item
from losses.meanflow_loss import MeanFlowLoss
from models.flow_matching.mlp import MLP
from runs.stored import load_model_from_checkpoint
from tests.conftest import TINY_OVERRIDES, launch, run_layout
from tests.test_models import tiny
from train import LossModule

pytestmark = pytest.mark.slow

# The MLP of the launcher run below (conftest's TINY_OVERRIDES: 2 x 32 on 2-D data) and
# loss/meanflow.yaml's defaults, so the launcher's compile can reuse the cached graphs.
BATCH = 64


def loss_and_grads(step: nn.Module, model: nn.Module, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One step from a fixed RNG state (the loss draws its own (s, t))."""
    torch.manual_seed(5)
    model.zero_grad(set_to_none=True)
    loss = step(batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("jvp_mode", ["fused", "separate"])
def test_compiled_meanflow_step_matches_eager(jvp_mode: str) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLP(data_dim=2, hidden=32, depth=2)
    module = LossModule(model, MeanFlowLoss(jvp_mode=jvp_mode))
    batch = make_base_item(torch.randn(BATCH, 2) * 4, torch.randn(BATCH, 2), torch.rand(BATCH))

    explained = torch._dynamo.explain(module)(batch)
    reasons = [r.reason.splitlines()[0] for r in explained.break_reasons]
    assert explained.graph_count == 1 and explained.graph_break_count == 0, reasons
    compiled_linears = sum("linear" in str(node.target) for graph in explained.graphs for node in graph.graph.nodes)
    assert compiled_linears == 3  # the MLP's three layers (the JVP is expanded later, by AOTAutograd)

    eager_loss, eager_grads = loss_and_grads(module, model, batch)
    # Inductor generates its own random numbers unless told to call the eager kernels;
    # the (s, t) draws must match for the compiled loss to equal the eager one.
    with torch._inductor.config.patch(fallback_random=True):
        compiled_loss, compiled_grads = loss_and_grads(torch.compile(module), model, batch)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    for compiled, eager in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["cnn", "unet", "dit"])
def test_image_model_meanflow_step_is_one_graph(kind: str) -> None:
    """What dynamo captures for each image model's fused MeanFlow step (its custom layers
    fall back to built-in ops under compilation): one graph, the JVP inside."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = tiny(kind).train()
    module = LossModule(model, MeanFlowLoss(jvp_mode="fused"))
    batch = make_base_item(torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.rand(4))
    explained = torch._dynamo.explain(module)(batch)
    reasons = [r.reason.splitlines()[0] for r in explained.break_reasons]
    assert explained.graph_count == 1 and explained.graph_break_count == 0, reasons


def test_launcher_trains_compiled_meanflow(tmp_path) -> None:
    out = tmp_path / "outputs"
    # compiled, every jvp_mode runs the fused pass (see above); the run names it explicitly
    result = launch(["run_name=compiled", *TINY_OVERRIDES, "compile=true", "loss=meanflow", "loss.jvp_mode=fused",
                     "epochs=1", f"output_dir={out}"], cwd=tmp_path, timeout=480)
    assert result.returncode == 0, result.stderr[-3000:]
    last = run_layout(out, "compiled").last
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["step"] == 8 and state["config"]["compile"] is True and state["config"]["loss"]["jvp_mode"] == "fused"
    # The checkpoint holds the plain module (no torch.compile "_orig_mod." prefix), so it
    # loads into an un-compiled model.
    assert not any(k.startswith("_orig_mod") for k in state["model"])
    model, _, _ = load_model_from_checkpoint(str(last), "cpu")
    assert all(torch.isfinite(p).all() for p in model.parameters())
