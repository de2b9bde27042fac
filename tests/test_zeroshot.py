"""Zero-shot quantization: generator, BN-statistics and AMA against formulas, and a tiny end-to-end run."""

import math

import pytest
import torch
import torch.nn.functional as F

import fxquant
from fxquant.quant.kernel import MIN_STEP
from fxquant.quant.quantizers import LSQQuantizer
from fxquant.zeroshot import BNStatistics, Generator, ama_logits, dilated_depthwise


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 30, 30)])
@pytest.mark.parametrize("long_range", [True, False])
def test_generator_shapes_and_normalised_range(shape, long_range):
    g = Generator(10, shape, latent_dim=16, channels=8, long_range=long_range)
    z, y = g.sample(32)
    x = g(z, y)
    assert x.shape == (32, *shape) and torch.isfinite(x).all()
    if shape[1] % 4 == 0:  # ends in BN(affine=False): per-channel zero mean, unit variance over the batch
        torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(shape[0]), atol=1e-4, rtol=0)
        torch.testing.assert_close(x.var((0, 2, 3), unbiased=False), torch.ones(shape[0]), atol=1e-2, rtol=0)


def test_phase_split_dilated_depthwise_is_exact():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 13, 17, dtype=torch.float64)
    w, b = torch.randn(5, 1, 7, 7, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    expected = F.conv2d(x, w, b, padding=9, dilation=3, groups=5)
    torch.testing.assert_close(dilated_depthwise(x, w, b, 3), expected, rtol=0, atol=1e-12)


def test_bn_statistics_loss_is_zero_when_statistics_match():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3).eval()
    x = torch.randn(16, 3, 5, 5) * 2 + 1
    bn.running_mean.copy_(x.mean((0, 2, 3)))
    bn.running_var.copy_(x.var((0, 2, 3), unbiased=False))
    with BNStatistics(bn) as stats:
        bn(x)
    assert float(stats.loss()) == pytest.approx(0.0, abs=1e-10)
    with BNStatistics(bn) as stats:
        bn(x + 1)  # mean off by one in each of 3 channels
    assert float(stats.loss()) == pytest.approx(3.0, rel=1e-5)


def test_ama_against_the_formula():
    torch.manual_seed(0)
    f, w, y = torch.randn(4, 6), torch.randn(3, 6), torch.tensor([0, 2, 1, 2])
    logits = ama_logits(f, w, y, margin=0.3, scale=10.0)
    for i in range(4):
        for j in range(3):
            cos = float(F.cosine_similarity(f[i : i + 1], w[j : j + 1]))
            expected = 10.0 * (math.cos(math.acos(cos) + 0.3) if j == int(y[i]) else cos)
            assert float(logits[i, j]) == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert torch.equal(
        ama_logits(f, w, y, 0.0, 1.0).argmax(1), (F.normalize(f, dim=1) @ F.normalize(w, dim=1).T).argmax(1)
    )


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 1), 1))


def _quadrant_data(n, seed):
    """4 classes: which quadrant of an 8×8 image is bright."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.3
    for i, c in enumerate(y.tolist()):
        r, s = divmod(c, 2)
        x[i, 0, 4 * r : 4 * r + 4, 4 * s : 4 * s + 4] += 2.0
    return x, y


def test_tiny_end_to_end_beats_no_training():
    torch.manual_seed(0)
    fp = TinyNet()
    x, y = _quadrant_data(512, 0)
    optimizer = torch.optim.Adam(fp.parameters(), lr=0.05)
    for _ in range(150):
        optimizer.zero_grad()
        F.cross_entropy(fp(x), y).backward()
        optimizer.step()
    fp.eval()
    test = [_quadrant_data(1000, 1)]
    assert fxquant.evaluate(fp, test)["top1"] > 95

    recipe = {
        "extends": "lrq_w4a4",
        "quant": {"weight": {"bits": 2}, "activation": {"bits": 2},
                  "first_layer": {"weight_bits": 2, "activation_bits": 2},
                  "last_layer": {"weight_bits": 2, "activation_bits": 2}},
        "zeroshot": {"iterations": 150, "warmup_iterations": 30, "batch_size": 64, "latent_dim": 16,
                     "generator_channels": 16, "student_optimizer": "adam", "student_lr": 0.01},
    }  # fmt: skip
    # the baseline: the same generator warm-up, quantizers initialised on its images, no student training
    untrained = fxquant.prepare_qat(fp, recipe)
    warm = fxquant.zeroshot.train(
        untrained, {"iterations": 30, "warmup_iterations": 30}, image_shape=(1, 8, 8), progress=False
    )
    fxquant.calibrate(untrained, warm.generator(*warm.generator.sample(64)).detach())
    baseline = fxquant.evaluate(untrained, test)["top1"]
    trained = fxquant.prepare_qat(fp, recipe)
    result = fxquant.zeroshot.train(trained, image_shape=(1, 8, 8), progress=False)
    assert fxquant.evaluate(trained, test)["top1"] > baseline + 5
    assert len(result.history) == 150 and "student_kd" in result.history[-1]


def test_student_steps_stay_positive_under_a_huge_learning_rate():
    # The kernel reads max(step, MIN_STEP) without writing it back, so every optimizer loop must clamp the stored
    # steps after it steps (TrainStep does); the zero-shot student's loop did not.
    torch.manual_seed(0)
    qmodel = fxquant.prepare_qat(TinyNet(), {"extends": "lrq_w4a4"})
    settings = {"iterations": 3, "warmup_iterations": 1, "batch_size": 8, "latent_dim": 8,
                "generator_channels": 8, "student_optimizer": "sgd", "student_lr": 1e4}  # fmt: skip
    fxquant.zeroshot.train(qmodel, settings, image_shape=(1, 8, 8), progress=False)
    steps = [p for m in qmodel.modules() if isinstance(m, LSQQuantizer) for p in m.learned_steps()]
    assert steps and all(bool(p.min() >= torch.tensor(MIN_STEP, dtype=p.dtype)) for p in steps)
