"""DiT's own call: forward_with_cfg guides only the first three channels, as the released DiT does."""
import torch
from test_models import inputs, tiny_model


def test_forward_with_cfg_guides_the_first_three_channels_only():
    model = tiny_model()
    x, t, y = inputs(n=2)
    null = torch.full_like(y, 10)
    batch, times, labels = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, null)
        out = model.forward_with_cfg(batch, times, labels, cfg_scale=3.0)
        torch.testing.assert_close(model.forward_with_cfg(batch, times, labels, cfg_scale=1.0)[:2, :3], cond[:, :3])
    guided = uncond[:, :3] + 3.0 * (cond[:, :3] - uncond[:, :3])
    torch.testing.assert_close(out[:2, :3], guided, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[2:, :3], guided, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[:2, 3:], cond[:, 3:])
    torch.testing.assert_close(out[2:, 3:], uncond[:, 3:])
