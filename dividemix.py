"""The DivideMix algorithm, written once: warm-up, loss evaluation, GMM co-divide, co-refinement,
co-guessing, MixMatch, evaluation.

Every dataset script configures these functions through `DivideMixConfig` and hands them loaders; nothing
here knows which dataset it trains on. Loaders yield tuples of tensors:
  warm-up:    (images, labels)            eval:      (images, labels) in dataset order
  labeled:    (x, x2, labels, w)          unlabeled: (u, u2)          test: (images, labels)
A loader may expose `num_samples` (else len(loader.dataset) is used) and must expose `batch_size`.

Under torchrun with several processes each rank's loaders hold its shard (training: the same number of batches on
every rank; evaluation: a contiguous span): the nets to train are DistributedDataParallel wrappers, loss
evaluation and prediction gather their rows in rank order, and the prior penalty and the logged means are taken
over all ranks. In one process every one of these steps is the identity.
"""
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from sklearn.mixture import GaussianMixture

from distributed import broadcast_from_main, gather_rows, is_main_process, mean_over_ranks
from utils import Progress, timed


def cpu_native_bf16():
    """Whether torch reports bf16 instructions on this CPU (x86 AVX512_BF16 or AMX, Arm BF16)."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        found = capabilities()
        return any(bool(found.get(name)) for name in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"))
    # torch before get_capabilities: its private probes, where present
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)


def default_amp(device):
    """Whether bf16 autocast is on by default: with CUDA, and on a CPU with native bf16. Elsewhere the CPU
    emulates bf16, about 10x slower than fp32 (AVX2)."""
    return device.type == "cuda" or (device.type == "cpu" and cpu_native_bf16())


@dataclass
class Precision:
    """Numerics and memory layout of the forwards: bf16 autocast and channels_last (both off: plain fp32)."""

    amp: bool = False
    channels_last: bool = False

    @classmethod
    def from_args(cls, args, device, sources=None):
        """From --amp (None: default_amp of the device, written back to args) and --channels_last; sources, when
        given ({flag: where its value came from}), learns where --amp's came from."""
        if sources is not None:
            sources["amp"] = "flag" if args.amp is not None else f"default for {device.type}"
        if args.amp is None:
            args.amp = default_amp(device)
        return cls(amp=args.amp, channels_last=args.channels_last)

    def autocast(self, device):
        """bf16 autocast on the device when amp is on, otherwise a no-op context."""
        return torch.autocast(device.type, dtype=torch.bfloat16) if self.amp else nullcontext()

    def prepare(self, x):
        """Put an input batch in the memory layout the nets expect."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x


@dataclass
class DivideMixConfig:
    """Hyperparameters and the per-dataset switches of the authors' three scripts (docs/paper.md)."""

    num_class: int
    alpha: float = 4.0
    T: float = 0.5
    lambda_u: float = 25.0
    p_threshold: float = 0.5
    warm_up: int = 10
    rampup_length: int = 16
    # CIFAR trains on all 2B + 2U mixed rows with Lx + lambda * Lu; Clothing1M and WebVision use only the
    # first 2B mixed rows and no Lu.
    unlabeled_loss: bool = True
    # Number of past normalised loss vectors averaged as the GMM input (5 for CIFAR at 90% noise).
    loss_window: int = 1
    precision: Precision = field(default_factory=Precision)
    # Successors' ideas, off by default. RSL's class-wise division: one GMM per observed class ("classwise"); a
    # class with fewer than classwise_min_samples samples takes the global fit's probabilities.
    division: str = "global"
    classwise_min_samples: int = 20
    # Manifold DivideMix's MixEMatch: "input+embedding" also mixes the penultimate embeddings, by the inputs'
    # lambda and permutation, and adds their loss terms with weight lambda_e.
    mix: str = "input"
    lambda_e: float = 1.0

    @classmethod
    def from_args(cls, args, precision, unlabeled_loss, loss_window=1):
        """From a training script's flags (--num_class, --alpha, --T, --lambda_u, --p_threshold, --warm_up, and
        where the script has them --division, --mix, --lambda_e)."""
        return cls(num_class=args.num_class, alpha=args.alpha, T=args.T, lambda_u=args.lambda_u,
                   p_threshold=args.p_threshold, warm_up=args.warm_up, unlabeled_loss=unlabeled_loss,
                   loss_window=loss_window, precision=precision, division=getattr(args, "division", "global"),
                   mix=getattr(args, "mix", "input"), lambda_e=getattr(args, "lambda_e", 1.0))


# ----------------------------------------------------------------------------- formulas

def sharpen(p, T):
    """Temperature sharpening p**(1/T), renormalised over classes."""
    pt = p ** (1.0 / T)
    total = pt.sum(dim=1, keepdim=True)
    # A small T (about 0.02 and below) can underflow every power in a row to 0, and 0 / 0 is NaN: such rows are
    # sharpened in log space, the same distribution; all other rows keep the direct formula's values.
    return torch.where(total > 0, pt / total, torch.softmax(torch.log(p) / T, dim=1))


def linear_rampup(current, warm_up, lambda_u, rampup_length=16):
    """lambda_u * clip((current - warm_up) / rampup_length, 0, 1); current = epoch + batch_idx / num_iter."""
    return lambda_u * float(np.clip((current - warm_up) / rampup_length, 0.0, 1.0))


def confidence_penalty(logits):
    """Negative entropy mean(sum(p * log p)) used in warm-up against asymmetric noise and on Clothing1M."""
    log_p = F.log_softmax(logits, dim=1)
    return torch.mean(torch.sum(log_p.exp() * log_p, dim=1))


def prior_penalty(logits, num_class):
    """sum(prior * log(prior / mean softmax)) with a uniform prior: keeps predictions spread over classes.

    With several processes the mean softmax is the global batch's (every rank holds as many rows), so the penalty
    and its gradient are those of one process training on the whole batch."""
    prior = torch.full((num_class,), 1.0 / num_class, device=logits.device, dtype=torch.float32)
    pred_mean = mean_over_ranks(torch.softmax(logits.float(), dim=1).mean(0))
    return torch.sum(prior * torch.log(prior / pred_mean))


def semi_loss(logits_x, targets_x, logits_u, targets_u):
    """Lx: cross-entropy with soft targets; Lu: squared error of probabilities, mean over rows and classes."""
    Lx = -torch.mean(torch.sum(F.log_softmax(logits_x, dim=1) * targets_x, dim=1))
    if logits_u.shape[0] == 0:
        return Lx, logits_x.new_zeros(())
    Lu = torch.mean((torch.softmax(logits_u, dim=1) - targets_u) ** 2)
    return Lx, Lu


def normalise_losses(losses):
    """Min-max normalise per-sample losses to [0, 1] (all zeros when every loss is equal)."""
    lo, hi = losses.min(), losses.max()
    if hi <= lo:
        return torch.zeros_like(losses)
    return (losses - lo) / (hi - lo)


def gmm_input(history, window):
    """The GMM's input: the mean of the last `window` normalised loss vectors of a net's history."""
    return torch.stack(history[-window:]).mean(0)


def fit_gmm(input_loss):
    """Fit the paper's 2-component GMM; return (clean probability per sample, fitted model)."""
    x = input_loss.reshape(-1, 1).double().cpu().numpy()
    gmm = GaussianMixture(n_components=2, max_iter=10, tol=1e-2, reg_covar=5e-4)
    gmm.fit(x)
    prob = gmm.predict_proba(x)[:, gmm.means_.argmin()]
    return prob, gmm


def fit_gmm_classwise(input_loss, labels, min_samples):
    """Class-wise division (RSL): a GMM per observed class, each sample's clean probability from its class's fit.

    Classes with fewer than min_samples samples keep the global fit's probabilities. Returns (prob, the global
    GMM, the classes that fell back)."""
    prob, gmm = fit_gmm(input_loss)  # fitted first: the fallback, and the GMM the log and plots show
    labels = np.asarray(labels)
    fallback = []
    for c in np.unique(labels).tolist():
        rows = np.flatnonzero(labels == c)
        if len(rows) < min_samples:
            fallback.append(int(c))
            continue
        prob[rows] = fit_gmm(input_loss[torch.as_tensor(rows)])[0]
    return prob, gmm, fallback


def classwise_stats(prob, input_loss, labels, p_threshold, fallback):
    """Per observed class: labeled count and threshold (the largest GMM input still labeled; None if none)."""
    labels, x = np.asarray(labels), input_loss.numpy()
    pred = prob > p_threshold
    classes = np.unique(labels).tolist()
    thresholds = []
    for c in classes:
        kept = x[(labels == c) & pred]
        thresholds.append(float(kept.max()) if kept.size else None)
    return {"classes": classes, "labeled": [int(pred[labels == c].sum()) for c in classes],
            "threshold": thresholds, "fallback": fallback}


def division_stats(prob, p_threshold, clean=None):
    """Labeled count and, when the true clean mask is known, AUC, precision and recall of the division."""
    pred = prob > p_threshold
    stats = {"labeled": int(pred.sum()), "unlabeled": int((~pred).sum())}
    if clean is not None:
        clean = np.asarray(clean, dtype=bool)
        both = int((pred & clean).sum())
        one_class = clean.all() or not clean.any()
        stats["auc"] = float("nan") if one_class else float(roc_auc_score(clean, prob))
        stats["precision"] = both / stats["labeled"] if stats["labeled"] else float("nan")
        stats["recall"] = both / int(clean.sum()) if clean.any() else float("nan")
    return stats


def set_learning_rate(optimizer, base_lr, epoch, decay_epoch):
    """The single step decay: lr / 10 from `decay_epoch` on. Returns the lr set."""
    lr = base_lr / 10 if epoch >= decay_epoch else base_lr
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


# ----------------------------------------------------------------------------- phases

def _num_samples(loader):
    """Number of samples behind a loader."""
    n = getattr(loader, "num_samples", None)
    return n if n is not None else len(loader.dataset)


def warmup_epoch(net, optimizer, loader, device, penalty=False, desc="warm-up", precision=None):
    """One pass of cross-entropy over the noisy labels (plus the confidence penalty when asked); mean loss."""
    precision = precision or Precision()
    net.train()
    total = torch.zeros((), device=device)
    progress = Progress(desc, len(loader))
    steps = 0
    for steps, (inputs, labels) in enumerate(loader, 1):
        inputs = precision.prepare(inputs.to(device, non_blocking=True))
        labels = labels.to(device, non_blocking=True)
        with precision.autocast(device):
            logits = net(inputs).float()
        loss = F.cross_entropy(logits, labels)
        if penalty:
            loss = loss + confidence_penalty(logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
        progress.update(steps, loss=loss.detach())
    return float(mean_over_ranks(total)) / max(steps, 1)


@torch.no_grad()
def eval_train(net, loader, device, precision=None):
    """Per-sample cross-entropy of every training image in loader order (eval mode, no augmentation); with
    several processes each rank's rows, gathered in rank order."""
    precision = precision or Precision()
    net.eval()
    losses = []
    for inputs, labels in loader:
        inputs = precision.prepare(inputs.to(device, non_blocking=True))
        labels = labels.to(device, non_blocking=True)
        with precision.autocast(device):
            logits = net(inputs)
        losses.append(F.cross_entropy(logits.float(), labels, reduction="none"))
    return gather_rows(torch.cat(losses).cpu() if losses else torch.zeros(0))


def gmm_division(history, p_threshold, window, clean=None, labels=None, min_samples=20):
    """GMM division of one net's loss history: (clean probability w, GMM input, fitted GMM, stats).

    labels (the noisy labels) switch on the class-wise division: a GMM per class with at least min_samples
    samples; the stats then hold the per-class counts and thresholds."""
    input_loss = gmm_input(history, window)
    if labels is None:
        prob, gmm = fit_gmm(input_loss)
        return prob, input_loss, gmm, division_stats(prob, p_threshold, clean)
    prob, gmm, fallback = fit_gmm_classwise(input_loss, labels, min_samples)
    stats = division_stats(prob, p_threshold, clean)
    stats["classwise"] = classwise_stats(prob, input_loss, labels, p_threshold, fallback)
    return prob, input_loss, gmm, stats


def co_divide(nets, eval_loader, cfg, device, histories=None, clean=None, labels=None, overlap=True):
    """Co-divide: each net's per-sample losses, min-max normalised into its history, split by a GMM fitted on rank 0;
    every rank gets the divisions, (prob, GMM input, GMM, stats) per net, and the seconds of each phase.

    eval_loader and labels (the noisy labels, for the class-wise division; None: one global GMM) are the same for
    every net, or a function of the net's index (Clothing1M's fresh draw per net). histories: per net, the past
    normalised losses whose last cfg.loss_window are averaged (None: this epoch's alone). clean: the true clean
    mask, for the division's AUC, precision and recall. With CUDA and overlap, net k's fit (CPU) runs while net
    k + 1's losses are computed (GPU); the fits still run in net order, so their numpy draws are a sequential
    loop's. Pass overlap=False when making a loader draws from numpy's global generator, as the fit does.
    """
    histories = histories if histories is not None else [[] for _ in nets]
    divisions, timing = [None] * len(nets), {}
    overlap = overlap and device.type == "cuda"
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for k, net in enumerate(nets):
            t0 = time.perf_counter()
            loader = eval_loader(k) if callable(eval_loader) else eval_loader
            histories[k].append(normalise_losses(eval_train(net, loader, device, cfg.precision)))
            del histories[k][:-cfg.loss_window]  # only the averaged window is ever read
            timing[f"eval{k + 1}"] = time.perf_counter() - t0
            if pending is not None:
                divisions[k - 1], timing[f"gmm{k}"] = pending.result()
            if is_main_process():
                pending = pool.submit(timed, gmm_division, histories[k], cfg.p_threshold, cfg.loss_window, clean,
                                      labels(k) if callable(labels) else labels, cfg.classwise_min_samples)
            else:
                pending = pool.submit(lambda: (None, 0.0))
            if not overlap:
                divisions[k], timing[f"gmm{k + 1}"] = pending.result()
                pending = None
        if pending is not None:
            divisions[-1], timing[f"gmm{len(nets)}"] = pending.result()
    return broadcast_from_main(divisions), timing


def train_step(net, net2, optimizer, batch, cfg, lambda_now):
    """One DivideMix iteration: co-guessing, co-refinement, MixMatch, loss, SGD step. Returns (Lx, Lu, loss).

    batch = (x, x2, labels, w, u, u2) on the training device; u and u2 may have zero rows.
    """
    x, x2, labels, w, u, u2 = batch
    B = x.shape[0]
    precision = cfg.precision
    x, x2, u, u2 = (precision.prepare(t) for t in (x, x2, u, u2))
    targets = F.one_hot(labels, cfg.num_class).float()
    w = w.view(-1, 1).float()
    with torch.no_grad(), precision.autocast(x.device):
        # Six separate forwards, in the original order: each keeps its own BatchNorm batch statistics and
        # running-stat update on `net` (train mode); `net2` is frozen in eval mode.
        if u.shape[0]:
            out_u11, out_u12 = net(u).float(), net(u2).float()
            out_u21, out_u22 = net2(u).float(), net2(u2).float()
            # Co-guessing: average both nets' predictions on both views, then sharpen.
            pu = (torch.softmax(out_u11, 1) + torch.softmax(out_u12, 1)
                  + torch.softmax(out_u21, 1) + torch.softmax(out_u22, 1)) / 4
            targets_u = sharpen(pu, cfg.T)
        else:
            targets_u = targets.new_zeros((0, cfg.num_class))
        out_x, out_x2 = net(x).float(), net(x2).float()
        # Co-refinement: blend the noisy label with the net's own prediction by the other net's clean prob.
        px = (torch.softmax(out_x, 1) + torch.softmax(out_x2, 1)) / 2
        px = w * targets + (1 - w) * px
        targets_x = sharpen(px, cfg.T)

    all_inputs = torch.cat([x, x2, u, u2], dim=0)
    all_targets = torch.cat([targets_x, targets_x, targets_u, targets_u], dim=0)
    # Clothing1M / WebVision: only the first 2B rows (x, x2) are mixed and trained on; their partners come from
    # the permutation over all 2B + 2U rows.
    mix = draw_mix(all_inputs.shape[0], cfg.alpha, all_inputs.device)
    mixed_input, mixed_target = mixmatch(all_inputs, all_targets, cfg.alpha, None if cfg.unlabeled_loss else 2 * B,
                                         mix)

    with precision.autocast(x.device):
        logits = net(precision.prepare(mixed_input)).float()
    logits_x, logits_u = logits[:2 * B], logits[2 * B:]
    Lx, Lu = semi_loss(logits_x, mixed_target[:2 * B], logits_u, mixed_target[2 * B:])
    penalty = prior_penalty(logits, cfg.num_class)
    loss = Lx + lambda_now * Lu + penalty if cfg.unlabeled_loss else Lx + penalty
    if cfg.mix == "input+embedding":
        # MixEMatch: the unmixed inputs' embeddings mixed by the same lambda and partners, through the head
        with precision.autocast(x.device):
            logits_e = net(precision.prepare(all_inputs), mix=mix).float()[:mixed_target.shape[0]]
        Lx_e, Lu_e = semi_loss(logits_e[:2 * B], mixed_target[:2 * B], logits_e[2 * B:], mixed_target[2 * B:])
        loss = loss + cfg.lambda_e * (Lx_e + lambda_now * Lu_e if cfg.unlabeled_loss else Lx_e)

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return Lx.detach(), Lu.detach(), loss.detach()


def draw_mix(n, alpha, device):
    """MixMatch's draws for n rows: l ~ Beta(alpha, alpha) taken as max(l, 1 - l), so a mixed row stays closer to
    its first argument, and a random permutation giving each row its partner. Returns (l, permutation)."""
    lam = np.random.beta(alpha, alpha)
    if np.isnan(lam):  # alpha near the smallest double underflows numpy's draw; Beta(a, a) then tends to 0 or 1
        lam = 1.0
    return max(lam, 1 - lam), torch.randperm(n, device=device)


def mixmatch(all_inputs, all_targets, alpha, rows=None, mix=None):
    """Mix the first `rows` rows (None: all) with partners from a random permutation of all rows of this process's
    batch, by l ~ Beta(alpha, alpha) taken as max(l, 1 - l); mix: draw_mix's (l, permutation), drawn here if None.

    With several processes a row's partner comes from its own rank's rows and each rank draws its own l: the
    original's rule on a batch of B / world rows, with no images sent between processes (see docs/distributed.md)."""
    lam, idx = mix if mix is not None else draw_mix(all_inputs.shape[0], alpha, all_inputs.device)
    if rows is None:
        return lam * all_inputs + (1 - lam) * all_inputs[idx], lam * all_targets + (1 - lam) * all_targets[idx]
    return (lam * all_inputs[:rows] + (1 - lam) * all_inputs[idx[:rows]],
            lam * all_targets[:rows] + (1 - lam) * all_targets[idx[:rows]])


def train_epoch(epoch, net, net2, optimizer, labeled_loader, unlabeled_loader, cfg, device, desc="train"):
    """Train `net` for one pass over its labeled set, cycling the unlabeled set; `net2` only guesses.

    Returns the mean Lx, Lu and lambda and the number of iterations. An empty labeled set gives zero
    iterations; an empty unlabeled set (unlabeled_loader None) gives MixMatch over labeled rows only.
    """
    net.train()
    net2.eval()
    num_iter = _num_samples(labeled_loader) // labeled_loader.batch_size + 1
    sums = torch.zeros(2, device=device)
    lambda_sum, steps = 0.0, 0
    unlabeled_iter = iter(unlabeled_loader) if unlabeled_loader is not None else None
    progress = Progress(desc, len(labeled_loader))
    for batch_idx, (x, x2, labels, w) in enumerate(labeled_loader):
        if unlabeled_iter is not None:
            try:
                u, u2 = next(unlabeled_iter)
            except StopIteration:  # restart the unlabeled set only when it is exhausted
                unlabeled_iter = iter(unlabeled_loader)
                u, u2 = next(unlabeled_iter)
        else:
            u = u2 = x.new_zeros((0,) + tuple(x.shape[1:]))
        batch = [t.to(device, non_blocking=True) for t in (x, x2, labels, w, u, u2)]
        lambda_now = linear_rampup(epoch + batch_idx / num_iter, cfg.warm_up, cfg.lambda_u, cfg.rampup_length)
        Lx, Lu, _ = train_step(net, net2, optimizer, batch, cfg, lambda_now)
        sums += torch.stack([Lx, Lu])
        lambda_sum += lambda_now
        steps += 1
        progress.update(steps, Lx=Lx, Lu=Lu)
    if steps == 0:
        return {"Lx": float("nan"), "Lu": float("nan"), "lambda": float("nan"), "iterations": 0}
    Lx_mean, Lu_mean = (mean_over_ranks(sums) / steps).tolist()
    return {"Lx": Lx_mean, "Lu": Lu_mean, "lambda": lambda_sum / steps, "iterations": steps}


def co_warmup(epoch, nets, optimizers, make_loader, device, penalty, precision):
    """Warm up each net in turn, each on its own pass of make_loader(). Returns per-net records and seconds."""
    records, timing = [], {}
    for k, net in enumerate(nets):
        t0 = time.perf_counter()
        loss = warmup_epoch(net, optimizers[k], make_loader(), device, penalty=penalty,
                            desc=f"warm-up {epoch} net{k + 1}", precision=precision)
        timing[f"warmup{k + 1}"] = time.perf_counter() - t0
        records.append({"loss": loss})
    return records, timing


def co_train(epoch, nets, optimizers, probs, make_loaders, cfg, device):
    """Co-divide: train each net on the division made by the OTHER net's clean probabilities.

    make_loaders(k, pred, prob) builds (labeled, unlabeled) from net k's division; unlabeled may be None.
    Returns per net the train_epoch result, and the seconds per net.
    """
    results, timing = [], {}
    for k, net in enumerate(nets):
        other = 1 - k
        prob = probs[other]
        labeled, unlabeled = make_loaders(other, prob > cfg.p_threshold, prob)
        if _num_samples(labeled) == 0:
            print(f"net{k + 1}: net{other + 1}'s division labels no sample; net{k + 1} is not trained this epoch")
        elif unlabeled is None:
            print(f"net{k + 1}: net{other + 1}'s division leaves no unlabeled sample; MixMatch over labeled rows only")
        t0 = time.perf_counter()
        results.append(train_epoch(epoch, net, nets[other], optimizers[k], labeled, unlabeled, cfg, device,
                                   desc=f"epoch {epoch} net{k + 1}"))
        timing[f"train{k + 1}"] = time.perf_counter() - t0
    return results, timing


@torch.no_grad()
def embed(net, loader, device, precision=None):
    """Penultimate embeddings (net.features, eval mode) of every sample of an in-order loader, in loader order;
    with several processes each rank's rows, gathered in rank order. Returned on the training device."""
    precision = precision or Precision()
    net.eval()
    rows = []
    for inputs, _ in loader:
        with precision.autocast(device):
            rows.append(net.features(precision.prepare(inputs.to(device, non_blocking=True))).float())
    return gather_rows(torch.cat(rows).cpu() if rows else torch.zeros(0)).to(device)


def knn_scores(features, k, chunk=1024):
    """Each sample's mean cosine distance to its k nearest other samples: exact, by chunked matrix products on the
    features' device (an out-of-distribution image lies far from the rest)."""
    z = F.normalize(features.float(), dim=1)
    n = z.shape[0]
    k = min(k, n - 1)
    scores = torch.empty(n, device=z.device)
    for start in range(0, n, chunk):
        sim = z[start:start + chunk] @ z.T
        rows = torch.arange(start, min(start + chunk, n), device=z.device)
        sim[rows - start, rows] = -float("inf")  # a sample is not its own neighbour
        scores[rows] = 1 - sim.topk(k, dim=1).values.mean(1)
    return scores


def ood_removal(scores, fraction):
    """The samples to take out of both the labeled and the unlabeled set: the int(fraction * N) highest scores."""
    removed = np.zeros(len(scores), dtype=bool)
    count = int(fraction * len(scores))
    if count:
        removed[torch.as_tensor(scores).cpu().topk(count).indices.numpy()] = True
    return removed


def gmm_summary(gmm):
    """The fitted GMM's means, variances and weights as lists (for the JSON log)."""
    return {"means": gmm.means_.ravel().tolist(), "vars": gmm.covariances_.ravel().tolist(),
            "weights": gmm.weights_.ravel().tolist()}


@torch.no_grad()
def predict(nets, loader, device, precision=None):
    """Summed logits of `nets` (eval mode) over a loader, with the labels: (logits, labels) on the CPU."""
    precision = precision or Precision()
    for net in nets:
        net.eval()
    all_logits, all_labels = [], []
    for inputs, labels in loader:
        inputs = precision.prepare(inputs.to(device, non_blocking=True))
        with precision.autocast(device):
            logits = sum(net(inputs).float() for net in nets)
        all_logits.append(logits)
        all_labels.append(labels.to(device, non_blocking=True))
    if not all_logits:  # a rank whose span of a small set is empty
        return gather_rows(torch.zeros(0)), gather_rows(torch.zeros(0, dtype=torch.long))
    return gather_rows(torch.cat(all_logits).cpu()), gather_rows(torch.cat(all_labels).cpu())


def topk_accuracy(logits, labels, ks=(1,)):
    """Top-k accuracies in percent for each k."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices
    hit = top == labels.view(-1, 1)
    return [100.0 * hit[:, :min(k, maxk)].any(dim=1).double().mean().item() for k in ks]


def evaluate(nets, loader, device, ks=(1,), precision=None):
    """Top-k test accuracies (percent) of the summed logits of `nets`."""
    logits, labels = predict(nets, loader, device, precision)
    return topk_accuracy(logits, labels, ks)
