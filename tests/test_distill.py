import pytest
import torch
import torch.nn.functional as F

import adn
from adn.core.distill import SubPathDistillationLoss, distribution_kl, feature_kl
from adn.models import resnet20


def test_kl_is_zero_for_identical_distributions_and_positive_otherwise():
    a = torch.randn(4, 8, 5, 5)
    for mode in ("spatial", "pooled"):
        assert feature_kl(a, a.clone(), mode).item() == pytest.approx(0.0, abs=1e-6)
        assert feature_kl(a, torch.randn_like(a), mode).item() > 0


def test_spatial_mode_is_softmax_over_channels_at_each_position():
    t, s = torch.randn(2, 6, 3, 3), torch.randn(2, 6, 3, 3)
    expected = 0.0
    for b in range(2):
        for i in range(3):
            for j in range(3):
                p, q = F.softmax(t[b, :, i, j], 0), F.softmax(s[b, :, i, j], 0)
                expected += (p * (p.log() - q.log())).sum()
    assert feature_kl(t, s, "spatial").item() == pytest.approx(expected.item() / 18, rel=1e-5)
    pooled_t, pooled_s = t.mean((2, 3)), s.mean((2, 3))
    assert feature_kl(t, s, "pooled").item() == pytest.approx(distribution_kl(pooled_t, pooled_s, 1.0).item(), rel=1e-6)


def test_temperature_scales_by_t_squared():
    t, s = torch.randn(8, 10), torch.randn(8, 10)
    soft_t, soft_s = F.softmax(t / 4, 1), F.log_softmax(s / 4, 1)
    expected = F.kl_div(soft_s, soft_t, reduction="batchmean") * 16
    assert distribution_kl(t, s, 4.0).item() == pytest.approx(expected.item(), rel=1e-5)


def test_teacher_side_gets_no_gradient():
    t = torch.randn(4, 10, requires_grad=True)
    s = torch.randn(4, 10, requires_grad=True)
    distribution_kl(t, s, 1.0).backward()
    assert t.grad is None and s.grad is not None


def test_two_pass_gradients_equal_the_single_loss_gradients():
    """Algorithm 1 in two backward passes computes the gradient of the paper's one loss."""
    torch.manual_seed(0)
    net = adn.convert(resnet20(in_channels=1, width=4)).train()
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    loss_fn = SubPathDistillationLoss(alpha=0.5, temperature=2.0, feature_kd="spatial")
    state = {k: v.clone() for k, v in net.state_dict().items()}

    with net.capture_stage_outputs() as feats:
        ys = net(x, skip="FFF")
        hs = list(feats)
        yb = net(x, skip="TTT")
        hb = list(feats)
    total, terms = loss_fn(ys, yb, y, hs, hb)
    total.backward()
    single = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    net.load_state_dict(state)
    net.zero_grad(set_to_none=True)
    from adn.training.methods import adn_step

    result = adn_step(net, x, y, loss_fn)
    two_pass = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    assert single.keys() == two_pass.keys()
    for name in single:
        assert torch.allclose(single[name], two_pass[name], atol=1e-5), name
    assert result["terms"]["loss"] == pytest.approx(terms["loss"].item(), rel=1e-5)
    assert set(result["terms"]) == {"ce_super", "kd_features", "kd_logits", "loss"}


def test_loss_rejects_bad_settings():
    with pytest.raises(ValueError, match="alpha"):
        SubPathDistillationLoss(alpha=1.5)
    with pytest.raises(ValueError, match="feature_kd"):
        SubPathDistillationLoss(feature_kd="channels")
    with pytest.raises(ValueError, match="shape"):
        feature_kl(torch.randn(1, 4, 2, 2), torch.randn(1, 4, 3, 3))


def test_an_optional_label_loss_for_the_base_net_adds_its_cross_entropy():
    import torch.nn.functional as F

    torch.manual_seed(0)
    super_logits, base_logits = torch.randn(4, 10), torch.randn(4, 10, requires_grad=True)
    target = torch.randint(0, 10, (4,))
    plain = SubPathDistillationLoss(alpha=0.5, feature_kd="none")
    with_ce = SubPathDistillationLoss(alpha=0.5, feature_kd="none", base_ce=0.3)
    a, _ = plain.student_loss(base_logits, [], super_logits, [], target)
    b, terms = with_ce.student_loss(base_logits, [], super_logits, [], target)
    assert torch.allclose(b - a, 0.3 * F.cross_entropy(base_logits, target))
    assert "ce_base" in terms
    with pytest.raises(ValueError, match="needs the targets"):
        with_ce.student_loss(base_logits, [], super_logits, [])
