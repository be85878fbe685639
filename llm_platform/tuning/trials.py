"""Ray Train inside Ray Tune: the worker loop of an SFT trial, and the driver-side callbacks of a search.

A trial is a Tune function that builds and fits a ``TorchTrainer`` (Ray Train V2); Ray's
``TuneReportCallback`` forwards the workers' reports to Tune, where ASHA compares them. Three
things make that dependable here, each explained where it is done:

- the last step's row reaches Tune without ``step``, so ASHA does not stop a trial that is about
  to evaluate and save its adapter (``trial_loop_per_worker``);
- the placement group of a trial's Ray Train workers is freed when Tune stops the trial
  (``ReleaseStoppedRuns``), which Ray 2.60 does not do reliably;
- a local cluster tells its processes where its own state API is (``llm_platform.cluster``).
"""

from __future__ import annotations

import dataclasses

import ray
from ray import tune
from ray.tune.experiment import Trial
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

from llm_platform.training.config import ScalingSettings, SFTConfig
from llm_platform.training.job import Job
from llm_platform.tuning.space import TuneSearchConfig, alpha_for

PLACEMENT_GROUP = "placement_group"
"""Key of the rows that name the trial's Ray Train placement group."""
# A trial only waits on its Ray Train workers, which do the work, but Tune needs it to hold some
# resource: it holds a sliver of a CPU and its workers that much less, so N trials fit N cores.
TRIAL_CPU = 0.01
TRIAL_RESOURCES = {"CPU": TRIAL_CPU}


def worker_share(scaling: ScalingSettings) -> ScalingSettings:
    """The trial's worker resources: the SFT config's, less the CPU the trial itself holds."""
    cpus = max(scaling.cpus_per_worker - TRIAL_CPU / scaling.num_workers, TRIAL_CPU)
    return scaling.model_copy(update={"cpus_per_worker": cpus})


def trial_train(cfg: SFTConfig, folder) -> None:
    """The SFT job's worker loop, with two changes to the rows Tune sees. Each names the worker group's
    placement group (for ``ReleaseStoppedRuns``). The last step's row goes without ``step``: ASHA stops a
    trial the moment its time attribute reaches ``max_t``, which would end the workers before they
    evaluate and save the adapter; the trial reports its final figures once they are written."""
    from llm_platform.training.distributed import ray_train_context
    from llm_platform.training.loop import train_sft

    ctx = ray_train_context()
    group = ray.get_runtime_context().get_placement_group_id()
    send = ctx.report

    def report(row: dict, checkpoint_dir: str | None) -> None:
        tagged = {**row, PLACEMENT_GROUP: group}
        if row["step"] >= cfg.optim.max_steps:
            del tagged["step"]
        send(tagged, checkpoint_dir)

    train_sft(cfg, dataclasses.replace(ctx, report=report), folder)


TRIAL_JOB = Job(name="sft", config=SFTConfig, train=trial_train, example_config="tune_spaces/configs/local.yaml")
"""A trial is the SFT job (same skeleton and outputs) with Tune's view of its reports."""


def trial_dirname(trial: Trial) -> str:
    """Trial folders and names are the trial ids (also the trials' run names and SFT output folders)."""
    return trial.trial_id


class ReleaseStoppedRuns(tune.Callback):
    """Frees the Ray Train placement group of a trial that Tune stopped (ASHA) or lost.

    Ray 2.60 leaves it allocated (ray-project/ray#54305): it belongs to the Tune driver's job, not to
    the trial, and Ray Train's PlacementGroupCleaner can only free it through the cluster's state API
    (a dashboard, found by auto-detection). Left allocated, a few stopped trials hold every CPU and the
    next trial waits forever. Freeing it ends the trial's workers; trials run Ray Train with
    ``max_failures=0``, so its controller cannot start a new group before Tune ends the trial actor.
    A trial that ran to the end has freed its group already (its last row does not name it).
    """

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        _release(trial)

    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        _release(trial)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        _release(trial)


def _release(trial: Trial) -> None:
    group_id = (trial.last_result or {}).get(PLACEMENT_GROUP)
    if not group_id:
        return
    group = PlacementGroup(ray.PlacementGroupID.from_hex(group_id))
    if placement_group_table(group).get("state", "REMOVED") != "REMOVED":
        remove_placement_group(group)


class SearchProgress(tune.Callback):
    """A line per finished trial: its settings, how far it ran, its validation loss, the best so far."""

    def __init__(self, search: TuneSearchConfig):
        self.total = search.num_samples
        self.max_steps = search.max_steps
        self.alpha_rule = search.alpha_rule

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        print(self.line(trials, trial), flush=True)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        print(self.line(trials, trial) + f"\n    error: see {trial.error_file}", flush=True)

    def line(self, trials: list[Trial], trial: Trial) -> str:
        finished = [t for t in trials if t is trial or t.status in (Trial.TERMINATED, Trial.ERROR)]
        result = trial.last_result or {}
        steps = result.get("step", 0)
        rank, lr = trial.config["rank"], trial.config["lr"]
        if trial.status == Trial.ERROR:
            outcome = f"failed after {steps} steps"
        elif steps >= self.max_steps:
            outcome = f"ran all {steps} steps"
        else:
            outcome = f"stopped early at {steps}"
        figures = f"eval_loss {result['eval_loss']:.4f}" if "eval_loss" in result else "no eval_loss"
        if result.get("eval_accuracy") is not None:
            figures += f" accuracy {result['eval_accuracy']:.3f}"
        completed = [t for t in finished if t.status != Trial.ERROR and "eval_loss" in (t.last_result or {})
                     and t.last_result.get("step", 0) >= self.max_steps]
        best = min(completed, key=lambda t: t.last_result["eval_loss"], default=None)
        best_text = (f"{best.last_result['eval_loss']:.4f} (rank {best.config['rank']}, lr {best.config['lr']:.2e})"
                     if best else "none ran to the end yet")
        return (f"trial {len(finished)}/{self.total} {trial.trial_id}: rank {rank} alpha "
                f"{alpha_for(self.alpha_rule, rank)} lr {lr:.2e} | {outcome} | {figures} | best so far {best_text}")
