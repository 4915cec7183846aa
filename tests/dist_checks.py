"""Checks of the several-process pieces, run by tests/test_distributed.py as

    torchrun --standalone --nproc_per_node=2 tests/dist_checks.py OUT.json

Every rank runs every check (collectives need all ranks); a failed check raises, so the job fails. Rank 0 writes
the names of the checks that passed to OUT.json.
"""
import gc
import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from device_batches import Batches  # noqa: E402 (the project root is put on the path first)
from distributed import Shard, gather_objects, gather_rows, get_rank, make_shard, world_size, wrap_ddp  # noqa: E402
from dividemix import eval_train, evaluate, mixmatch, prior_penalty, warmup_epoch  # noqa: E402
from simclr import nt_xent  # noqa: E402


class FrozenBatchNorm(nn.BatchNorm2d):
    """BatchNorm that stays in eval mode: a step's result then does not depend on how the batch is split."""

    def train(self, mode=True):
        """Ignore train mode."""
        return super().train(False)


def tiny_net(seed):
    """A small conv net with an eval-mode BatchNorm, the same on every rank."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), FrozenBatchNorm(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 5))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.1, 0.1)
        net[1].running_var.uniform_(0.5, 1.5)
    return net


def shared_batch(n, seed=0):
    """Images and labels, the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 5, (n,), generator=g)


def check_warmup_step():
    """One DDP warm-up step on two shards equals one single-process step on the concatenated batch."""
    rank, world = get_rank(), world_size()
    x, y = shared_batch(8)
    reference = tiny_net(1)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    warmup_epoch(reference, opt, [(x, y)], torch.device("cpu"), penalty=True)  # the same on every rank
    net = tiny_net(1)
    ddp = wrap_ddp([net], torch.device("cpu"), sync_bn=False)[0]
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    b = 8 // world
    warmup_epoch(ddp, opt, [(x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b])], torch.device("cpu"),
                 penalty=True)
    for (name, p), q in zip(net.named_parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-6), (name, (p - q).abs().max())
    assert not torch.equal(net[0].weight, tiny_net(1)[0].weight)  # the step did change the weights


def check_prior_penalty():
    """The prior penalty over shards has the value and (after DDP's averaging) the gradient of the whole batch's."""
    rank, world = get_rank(), world_size()
    logits = torch.randn(8, 5, generator=torch.Generator().manual_seed(2))
    full = logits.clone().requires_grad_(True)
    prior = torch.full((5,), 0.2)
    ref = torch.sum(prior * torch.log(prior / torch.softmax(full, 1).mean(0)))
    ref.backward()
    b = 8 // world
    local = logits[rank * b:(rank + 1) * b].clone().requires_grad_(True)
    value = prior_penalty(local, 5)
    value.backward()
    assert torch.allclose(value, ref, atol=1e-6), (value, ref)
    assert torch.allclose(local.grad / world, full.grad[rank * b:(rank + 1) * b], atol=1e-7)


def check_mixing_partners():
    """MixMatch mixes each rank's rows with partners among that rank's own rows."""
    rank = get_rank()
    rows = torch.arange(8, dtype=torch.float32) + 100 * rank
    inputs = rows.view(8, 1, 1, 1).expand(8, 3, 2, 2).clone()
    targets = F.one_hot(torch.arange(8) % 5, 5).float()
    mixed, _ = mixmatch(inputs, targets, alpha=4.0)
    assert mixed.min() >= rows.min() and mixed.max() <= rows.max(), (rank, mixed.min(), mixed.max())


def check_shard_orders():
    """Shuffles are common to all ranks, dealt evenly (odd sizes padded), reproducible per epoch; spans tile."""
    shard = make_shard(123)
    for n in (1, 11, 13):
        for epoch in (0, 5):
            shard.start_epoch(epoch)
            mine = shard.order(n).tolist()
            again = Shard(123, get_rank(), world_size())
            again.start_epoch(epoch)
            assert again.order(n).tolist() == mine
            parts = gather_objects(mine)
            assert len({len(p) for p in parts}) == 1 and len(parts[0]) == -(-n // world_size())
            assert set().union(*map(set, parts)) == set(range(n))
        spans = gather_objects(shard.span(n))
        assert spans[0][0] == 0 and spans[-1][1] == n and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    rows = gather_rows(torch.full((get_rank() + 1, 2), float(get_rank())))
    assert rows[:, 0].tolist() == [r for r in range(world_size()) for _ in range(r + 1)]


def check_cifar_batches():
    """Every rank gets the same number of training batches of an odd-sized set; together they cover it."""
    shard = make_shard(7)
    shard.start_epoch(3)
    idx = torch.arange(100, 113)  # 13 samples
    loader = Batches(lambda i: (i,), idx, 4, True, shard)
    seen = [int(v) for (batch,) in loader for v in batch]
    counts = gather_objects(len(list(loader)))
    assert len(set(counts)) == 1, counts
    assert loader.batch_size == 4 // world_size()
    assert set().union(*map(set, gather_objects(seen))) == set(range(100, 113))


def check_gathered_evaluation():
    """Loss evaluation and test accuracy over spans, gathered, equal those of one process over the whole set."""
    net = tiny_net(3).eval()
    x, y = shared_batch(11, seed=4)
    with torch.no_grad():
        logits = net(x)
    loss_ref = F.cross_entropy(logits, y, reduction="none")
    acc_ref = 100.0 * (logits.argmax(1) == y).double().mean().item()
    shard = make_shard(1)
    loader = Batches(lambda i: (x[i], y[i]), torch.arange(11), 3, False, shard)
    losses = eval_train(net, loader, torch.device("cpu"))
    assert losses.shape == (11,) and torch.allclose(losses, loss_ref, atol=1e-6)
    assert abs(evaluate([net], loader, torch.device("cpu"))[0] - acc_ref) < 1e-9


def nt_xent_one_process(z, temperature):
    """NT-Xent as the SimCLR paper writes it, for rows [view 1 of n images; view 2 of the same n] in one process."""
    n2 = z.shape[0]
    sim = z @ z.T / temperature
    sim.fill_diagonal_(-float("inf"))
    return F.cross_entropy(sim, (torch.arange(n2) + n2 // 2) % n2)


def check_nt_xent_over_ranks():
    """NT-Xent with the negatives gathered from every rank: one SGD step of a DDP projection on two ranks (each its
    images' two views) equals the single-process step on the global batch, loss and weights."""
    rank, world = get_rank(), world_size()
    g = torch.Generator().manual_seed(5)
    images, noise = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    views = torch.cat([images, images + 0.1 * noise])  # view 1 of the 8 images, then view 2

    def projection():
        """The same linear projection on every rank."""
        torch.manual_seed(6)
        return nn.Linear(6, 4)

    def step(model, rows, loss_fn):
        """One SGD step on loss_fn of the given rows' unit projections; the loss."""
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        loss = loss_fn(F.normalize(model(rows), dim=1), 0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.detach()

    reference = projection()
    single = step(reference, views, nt_xent_one_process)
    b = 8 // world
    own = torch.cat([views[rank * b:(rank + 1) * b], views[8 + rank * b:8 + (rank + 1) * b]])
    net = projection()
    local = step(wrap_ddp([net], torch.device("cpu"), sync_bn=False)[0], own, nt_xent)
    mean = local.clone()
    dist.all_reduce(mean)
    assert torch.allclose(mean / world, single, atol=1e-6), (mean / world, single)
    for (name, p), q in zip(net.named_parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-6), (name, (p - q).abs().max())
    assert not torch.equal(net.weight, projection().weight)  # the step did change the weights


def main():
    """Run every check on every rank; rank 0 writes the passed names."""
    dist.init_process_group("gloo")
    checks = [check_warmup_step, check_prior_penalty, check_mixing_partners, check_shard_orders, check_cifar_batches,
              check_gathered_evaluation, check_nt_xent_over_ranks]
    np.random.seed(get_rank())
    torch.manual_seed(get_rank())
    passed = []
    for check in checks:
        check()
        passed.append(check.__name__)
    if get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(passed, f)
    # the DDP wrappers of the checks and their communication go before the process group does, on both ranks
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
