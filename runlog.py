"""
What a training run writes beside its checkpoints: log.jsonl (one JSON record per logged step), loss.png,
eval.json, and the same records to Weights & Biases when asked. Only rank 0 writes; on other processes
every method does nothing.
"""
import io
import json
import netrc
import os
import resource

import torch

from configurator import InputError
from optim import parts


class NoWandb:
    """Stands in for wandb when it is off, so that the loop logs without asking."""

    def log(self, record, step=None):
        pass


class RunLog:

    def __init__(self, out_dir, writes, checkpoint, title, config, wandb_log=False, wandb_project="",
                 wandb_run_name="", plot=True, plot_log_scale=True):
        """out_dir must be writable; checkpoint is the path a failed write says is intact; title heads loss.png."""
        self.out_dir, self.writes, self.checkpoint, self.title = out_dir, writes, checkpoint, title
        self.plot, self.plot_log_scale = plot, plot_log_scale
        self.wandb = NoWandb()
        if not writes:
            return
        try:
            os.makedirs(out_dir, exist_ok=True)
            probe = os.path.join(out_dir, ".write_test")
            open(probe, "w").close()
            os.remove(probe)
        except OSError as e:
            raise InputError(f"out_dir {out_dir} is not writable ({e.strerror}); choose another --out_dir") from None
        if wandb_log:
            import wandb
            try:  # `wandb login` keeps the key in ~/.netrc rather than the environment
                logged_in = netrc.netrc().authenticators("api.wandb.ai") is not None
            except (OSError, netrc.NetrcParseError):
                logged_in = False
            if not (os.environ.get("WANDB_API_KEY") or logged_in or os.environ.get("WANDB_MODE")):
                os.environ["WANDB_MODE"] = "offline"
                print(f"wandb: no API key, logging offline; upload later with: "
                      f"wandb sync {out_dir}/wandb/offline-run-*", flush=True)
            wandb.init(project=wandb_project, name=wandb_run_name or os.path.basename(out_dir.rstrip("/")),
                       config=config, dir=out_dir)
            self.wandb = wandb

    def record(self, record):
        """One step's figures: a line of log.jsonl and a wandb step; an evaluation's also redraw loss.png."""
        if not self.writes:
            return
        self.write("log.jsonl", json.dumps(record) + "\n", "a")
        self.wandb.log(record, step=record["iter"])
        if self.plot and "val_loss" in record:
            self.plot_losses()

    def write(self, name, data, mode="w"):
        """Write data to out_dir/name: mode "a" appends, the others replace the file atomically. A write
        that fails (a full disk, a file size limit, out_dir gone) ends the run in one line and leaves the
        file as it was, so a resumed run can go on appending to log.jsonl."""
        if not self.writes:
            return
        path = os.path.join(self.out_dir, name)
        target = path if mode == "a" else path + ".tmp"
        size = os.path.getsize(path) if mode == "a" and os.path.exists(path) else 0
        try:
            with open(target, mode) as f:
                f.write(data)
            if target != path:
                os.replace(target, path)
        except OSError as e:
            try:  # a partly written line or file would break the next reader
                if target == path:
                    os.truncate(path, size)
                elif os.path.exists(target):
                    os.remove(target)
            except OSError:
                pass
            raise InputError(f"could not write {path} ({e.strerror}); {self.checkpoint} is intact. "
                             f"Free disk space or choose a writable --out_dir, then resume") from None

    def plot_losses(self):
        """Train and validation loss against iterations (bottom axis) and tokens seen (top axis); below, when
        eval_tasks are scored, their acc_norm."""
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
        import matplotlib.ticker
        with open(os.path.join(self.out_dir, "log.jsonl")) as f:
            records = [json.loads(line) for line in f]
        tasks = sorted({key for r in records for key, value in r.items()
                        if key.endswith("/acc_norm") and value is not None})
        fig, axes = plt.subplots(1 + bool(tasks), 1, figsize=(8, 5 + 3 * bool(tasks)), dpi=120, squeeze=False,
                                 height_ratios=[5, 3][:1 + bool(tasks)])
        ax = axes[0, 0]
        train = [(r["iter"], r["loss"]) for r in records if "loss" in r]
        val = [(r["iter"], r["val_loss"]) for r in records if "val_loss" in r]
        if train:
            ax.plot(*zip(*train, strict=True), color="tab:blue", alpha=0.6, lw=1, label="train loss (per step)")
        if val:
            ax.plot(*zip(*val, strict=True), color="tab:orange", marker="o", ms=3, lw=2,
                    label="validation loss (estimate)")
        if self.plot_log_scale:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
        ax.set_xlabel("iteration")
        ax.set_ylabel("cross-entropy loss (nats per token)")
        tokens_per_iter = records[-1]["tokens"] / records[-1]["iter"]
        millions = (lambda i: i * tokens_per_iter / 1e6, lambda t: t * 1e6 / tokens_per_iter)  # iterations <-> tokens
        top = ax.secondary_xaxis("top", functions=millions)
        top.set_xlabel("tokens seen (millions)")
        ax.set_title(self.title + (f", best val {min(v for _, v in val):.3f}" if val else ""))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        if tasks:
            panel = axes[1, 0]
            for key in tasks:
                panel.plot(*zip(*[(r["iter"], r[key]) for r in records if r.get(key) is not None], strict=True),
                           marker="o", ms=3, label=key.removesuffix("/acc_norm"))
            panel.set_xlabel("iteration")
            panel.set_ylabel("accuracy (acc_norm)")
            panel.grid(True, alpha=0.3)
            panel.legend()
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png")
        plt.close(fig)
        self.write("loss.png", png.getvalue(), "wb")


def memory_report(model, optimizer, device):
    """What this process holds of the weights, gradients and optimizer state (its shards under fsdp), and
    its peak memory so far: read after the first step, when all three exist."""
    def megabytes(tensors):
        local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]  # a DTensor's own shard
        return sum(t.numel() * t.element_size() for t in local) / 2 ** 20
    params = list(model.parameters())
    state = [v for opt in parts(optimizer) for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    peak = (f"peak cuda memory {torch.cuda.max_memory_allocated(device) / 2 ** 20:,.0f} MB"
            if device.startswith("cuda") else
            f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10:,.0f} MB")
    return (f"memory per process: weights {megabytes(params):,.1f} MB, gradients "
            f"{megabytes(p.grad for p in params if p.grad is not None):,.1f} MB, optimizer state "
            f"{megabytes(state):,.1f} MB; {peak}")
