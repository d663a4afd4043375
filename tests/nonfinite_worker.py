"""A training run whose loss turns to nan at the steps in $DLM_NAN_STEPS (comma-separated, 1-based), on every
rank: `torchrun tests/nonfinite_worker.py <train_adapt.py flags>`. The injected steps are exactly those,
however the run is split over ranks, so the tests know which step must be skipped or stopped at."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_adapt  # noqa: E402

BAD = {int(s) for s in os.environ.get("DLM_NAN_STEPS", "").split(",") if s}
real_loss, calls = train_adapt.diffusion_loss, [0]


def loss_with_nan(*a, **kw):
    out = real_loss(*a, **kw)
    if kw.get("generator") is not None:   # a training micro-step (validation draws no annealing noise)
        calls[0] += 1
        if calls[0] in BAD:
            return (out[0] * float("nan"),) + tuple(out[1:])
    return out


train_adapt.diffusion_loss = loss_with_nan

if __name__ == "__main__":
    train_adapt.main(sys.argv[1:])
