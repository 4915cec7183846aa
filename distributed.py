"""Several processes under torchrun (device, process group, collectives, DDP, data shards) and seeding."""
import inspect
import os
import random
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from cli import ReportedOnRankZero, UserError

DDP_PARAMETERS = inspect.signature(DistributedDataParallel).parameters


def seed_everything(seed):
    """Seed Python's, numpy's and torch's global generators from one integer."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def select_device(gpuid):
    """CUDA device `gpuid` when CUDA is available, otherwise the CPU."""
    if torch.cuda.is_available():
        if not 0 <= gpuid < torch.cuda.device_count():
            raise UserError(f"--gpuid {gpuid} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
        torch.cuda.set_device(gpuid)
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda", gpuid)
    return torch.device("cpu")


def init_distributed(gpuid=None):
    """The training device. Under torchrun: cuda:LOCAL_RANK (--gpuid ignored), and with several processes the
    process group (NCCL on CUDA, gloo on the CPU); ranks other than 0 print nothing to stdout."""
    if "WORLD_SIZE" not in os.environ:
        return select_device(gpuid or 0)
    rank, local, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local} has no CUDA device ({torch.cuda.device_count()} visible): give "
                            "torchrun at most that many --nproc_per_node")
        device = select_device(local)
    else:
        device = torch.device("cpu")
    ignored = f" (--gpuid {gpuid} is ignored under torchrun)" if gpuid is not None else ""
    print(f"torchrun: rank {rank} of {world} on {device}{ignored}", flush=True)
    if world > 1:
        try:
            if device.type == "cuda":
                dist.init_process_group("nccl", device_id=device)
            else:
                dist.init_process_group("gloo")
        except Exception as exc:
            if not (restart_count() and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"):
                raise
            # torch's rendezvous store, shared with the workers by default, still holds the addresses of the
            # attempt before; restarted workers may read those and fail to connect
            raise UserError(f"the processes of torchrun restart {restart_count()} could not connect ({exc}): export "
                            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun --max_restarts, then run it again "
                            "(it continues from the last checkpoint)") from None
        if rank != 0:  # one console: the logs and progress lines are rank 0's
            sys.stdout = open(os.devnull, "w")
    return device


def world_size():
    """Number of processes of the run (1 without torchrun or with one process)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def get_rank():
    """This process's rank (0 in a single process)."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_main_process():
    """Whether this process writes the run's files (rank 0)."""
    return get_rank() == 0


def restart_count():
    """How often torchrun (--max_restarts) has restarted the job: 0 on its first attempt and without torchrun."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def local_batch_size(batch_size, flag="--batch_size"):
    """A global batch's share per process; UserError when it does not divide evenly."""
    world = world_size()
    if batch_size % world:
        raise UserError(f"{flag} {batch_size} does not split evenly over {world} processes: give a multiple of "
                        f"{world} (it is the global batch, as in the paper)")
    return batch_size // world


def gather_rows(tensor):
    """Every rank's rows (first dimension) concatenated in rank order, on every rank; the tensor itself in one
    process. Ranks may hold different numbers of rows."""
    if world_size() == 1:
        return tensor
    parts = [None] * world_size()
    dist.all_gather_object(parts, tensor.cpu())
    return torch.cat(parts)


def gather_objects(value):
    """[value of rank 0, value of rank 1, ...] on every rank; [value] in one process."""
    if world_size() == 1:
        return [value]
    parts = [None] * world_size()
    dist.all_gather_object(parts, value)
    return parts


def broadcast_from_main(value):
    """Rank 0's value on every rank (the argument of other ranks is ignored)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn, *args):
    """fn(*args) computed once, on rank 0, and its result given to every rank. A UserError of rank 0 is raised
    there and ends the other ranks quietly (exit 2): rank 0 reports it for the job."""
    if world_size() == 1:
        return fn(*args)
    if not is_main_process():
        kind, value = broadcast_from_main(None)
        if kind == "error":
            raise ReportedOnRankZero(value)
        return value
    try:
        value = fn(*args)
    except UserError as exc:
        broadcast_from_main(("error", str(exc)))
        raise
    broadcast_from_main(("value", value))
    return value


# torch.distributed.nn.functional.all_reduce has the same gradient, but torch 2.14 deprecates it with a
# FutureWarning on every process's stderr, and the replacement it names is private
class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose gradient is the all-reduced gradient: d(sum)/d(own part) summed over every rank's
    loss. DistributedDataParallel then averages the ranks' gradients, which gives the gradient of the one loss."""

    @staticmethod
    def forward(ctx, tensor):
        """Sum of the tensor over the ranks."""
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad):
        """Sum of the incoming gradients over the ranks."""
        total = grad.clone()
        dist.all_reduce(total)
        return total


def mean_over_ranks(tensor):
    """The mean of a tensor over the ranks, differentiable; the tensor itself in one process."""
    if world_size() == 1:
        return tensor
    return _SumOverRanks.apply(tensor) / world_size()


class _GatherRows(torch.autograd.Function):
    """All-gather of equally many rows per rank whose gradient reaches every rank's own rows: the incoming
    gradient of the gathered rows is summed over the ranks (each rank's loss uses every row), then each rank keeps
    its own slice. DistributedDataParallel's average then gives the gradient of the mean of the ranks' losses."""

    @staticmethod
    def forward(ctx, tensor):
        """Every rank's rows, in rank order."""
        parts = [torch.empty_like(tensor) for _ in range(world_size())]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rows, ctx.rank = tensor.shape[0], get_rank()
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        """This rank's slice of the gradient summed over the ranks."""
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        return total[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_rows_with_grad(tensor):
    """Every rank's rows (the same number on each) concatenated in rank order, differentiable; the tensor itself
    in one process."""
    if world_size() == 1:
        return tensor
    return _GatherRows.apply(tensor)


def wrap_ddp(nets, device, sync_bn):
    """The nets to train: DistributedDataParallel wrappers (BatchNorm synchronised when sync_bn) with several
    processes, the nets themselves in one. SyncBatchNorm keeps the Parameter and buffer objects, so optimizers
    made before stay valid and state_dict keys do not change."""
    if world_size() == 1:
        return list(nets)
    wrapped = []
    for net in nets:
        if sync_bn:
            converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
            assert converted is net, "the root module of a net is no BatchNorm"
        ids = [device.index] if device.type == "cuda" else None
        # BatchNorm buffers are not broadcast at every forward: sync_buffers gives every rank rank 0's at the end
        # of each epoch (with SyncBatchNorm they agree anyway). Newer torch names the switch forward_sync_buffers.
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in DDP_PARAMETERS
                   else {"broadcast_buffers": False})
        wrapped.append(DistributedDataParallel(net, device_ids=ids, **no_sync))
    return wrapped


def sync_buffers(nets):
    """Give every rank rank 0's buffers (BatchNorm running statistics): without SyncBatchNorm each rank's running
    statistics follow its own shard, and evaluation and checkpoints need one set."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for net in nets:
            for buffer in net.buffers():
                dist.broadcast(buffer, src=0)


def check_sync_bn(sync_bn, device):
    """The --sync_bn setting in force: on by default under several processes on CUDA; torch's SyncBatchNorm has no
    CPU kernels, so on the CPU it is off (asking for it is an error)."""
    if world_size() == 1:
        return False
    if device.type != "cuda":
        if sync_bn:
            raise UserError("--sync_bn needs CUDA (torch's SyncBatchNorm has no CPU kernels): drop it on the CPU, "
                            "where each process keeps BatchNorm statistics of its own shard")
        print("BatchNorm: per-process statistics (SyncBatchNorm needs CUDA)", flush=True)
        return False
    return True if sync_bn is None else sync_bn


class ShardSampler(torch.utils.data.Sampler):
    """DataLoader sampler of this rank's share of a shuffled order drawn by a Shard at each pass."""

    def __init__(self, n, shard):
        """n: samples of the dataset; shard: the run's Shard."""
        self.n, self.shard = n, shard

    def __len__(self):
        """Samples per pass on this rank (the same on every rank)."""
        return -(-self.n // self.shard.world)

    def __iter__(self):
        """This rank's indices of a fresh shuffle."""
        return iter(self.shard.order(self.n).tolist())


# Not DistributedSampler: it reseeds every pass from seed + epoch, so each pass of an epoch repeats one order;
# here the passes of an epoch draw in turn from one generator seeded from (seed, epoch).
class Shard:
    """How data is split over the ranks of a run.

    Training passes: a shuffle drawn from a generator that every rank seeds from --seed and the epoch at the start
    of each epoch and draws from in the same order (so all ranks hold the same order), padded by repeating its
    head to a multiple of the world size as DistributedSampler does, and dealt round-robin: every rank gets the
    same number of samples, so the same number of iterations. Evaluation passes: contiguous spans, no padding, so
    that rows gathered in rank order are the dataset's rows in order, each once.
    """

    def __init__(self, seed, rank, world):
        """seed: --seed; rank and world of this process."""
        self.seed, self.rank, self.world = seed, rank, world
        self.generator = torch.Generator()
        self.numpy = np.random.RandomState()
        self.start_epoch(0)

    def start_epoch(self, epoch):
        """Reseed the shared generators from (seed, epoch): identical on every rank, and after a resume."""
        state = np.random.SeedSequence([self.seed, epoch]).generate_state(2)
        self.generator.manual_seed(int(state[0]))
        self.numpy.seed(int(state[1]))

    def order(self, n):
        """This rank's positions 0..n-1 of a fresh shuffle (a 1-D long tensor of ceil(n / world) entries)."""
        order = torch.randperm(n, generator=self.generator)
        total = -(-n // self.world) * self.world
        if total > n:
            order = order.repeat(-(-total // n))[:total]
        return order[self.rank::self.world]

    def span(self, n):
        """This rank's contiguous range (start, stop) of n rows in order."""
        per, extra = divmod(n, self.world)
        start = self.rank * per + min(self.rank, extra)
        return start, start + per + (self.rank < extra)

    def sampler(self, n):
        """A DataLoader sampler of this rank's share of a fresh shuffle of n samples at each pass."""
        return ShardSampler(n, self)


def make_shard(seed):
    """The run's Shard with several processes, None in one (the single-process code paths stay as they are)."""
    return Shard(seed, get_rank(), world_size()) if world_size() > 1 else None


def seed_process(seed):
    """Seed the global generators: with --seed in one process, with --seed + rank in each of several (their
    augmentation and MixMatch draws differ; shuffles come from the Shard)."""
    seed_everything((seed + get_rank()) % 2 ** 32)
