"""A sweep's runs as one SLURM job array, through submitit (the optional [cluster] extra).

Each array task runs one run of the sweep, through the function the sweep hands over (its
run_one). Preemption and time limits: SLURM warns a job first (submitit asks for SIGUSR2 90 s
before the limit); training then stops after its current step with a fresh checkpoint, and
submitit requeues the job, which resumes from that checkpoint. `scancel` sends SIGTERM:
training checkpoints the same way, the run is reported as cancelled, and the next sweep
resumes it.

The waiting side trusts sacct (through submitit's watcher), never only the result files,
so a job that dies without writing its result is reported instead of waited on forever.
"""

import os
import shutil
import signal
import subprocess
import time

from nanomarkov.errors import NanoMarkovError

# sacct's states of a job that may still run (or run again, once requeued).
ACTIVE = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "COMPLETING",
    "CONFIGURING",
    "RESIZING",
    "SUSPENDED",
    "SIGNALING",
    "STAGE_OUT",
    "STOPPED",
    "PREEMPTED",
    "UNKNOWN",
    "READY",
}
# A job sacct has not heard of after this long will not show up: accounting is down or the job is lost.
UNKNOWN_GIVE_UP_S = 120


def require_submitit():
    """The submitit module, or an error saying how to install it."""
    try:
        import submitit
    except ImportError:
        raise NanoMarkovError('the SLURM launcher needs submitit: pip install -e ".[cluster]"') from None
    return submitit


def require_slurm():
    """Refuse --launcher slurm before anything is written where no job could be submitted: no sbatch on
    PATH, or a controller that does not answer `scontrol ping` (its output captured: one line is ours)."""
    if shutil.which("sbatch") is None:
        raise NanoMarkovError(
            "--launcher slurm needs SLURM's sbatch on PATH: on this machine start a one-node "
            "cluster with scripts/slurm_local.sh up (as root), or see your cluster's docs"
        )
    scontrol = shutil.which("scontrol")
    if scontrol is None:  # sbatch alone (a wrapper, a login node without it): its own submission will tell
        return
    try:
        ping = subprocess.run([scontrol, "ping"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return
    if ping.returncode != 0:
        said = next((line.strip() for line in (ping.stdout + ping.stderr).splitlines() if line.strip()), "no answer")
        raise NanoMarkovError(
            f"--launcher slurm: SLURM's controller does not answer (scontrol ping: {said}); start it "
            "(on this machine: scripts/slurm_local.sh up, as root) or use --launcher local"
        )


# slurm_executor's options, named as `nanomarkov sweep` spells them.
SLURM_FLAGS = ("slurm_partition", "time", "cpus_per_task", "gpus_per_task", "mem", "array_parallelism", "sbatch")


def slurm_executor(
    folder,
    slurm_partition=None,
    time=60,
    cpus_per_task=1,
    gpus_per_task=None,
    mem=None,
    array_parallelism=None,
    sbatch=(),
):
    """A submitit SlurmExecutor writing its scripts and logs under folder; sbatch: extra 'KEY=VALUE' (or 'KEY')."""
    require_slurm()
    executor = require_submitit().SlurmExecutor(folder=folder)
    extra = {}
    for item in sbatch:
        key, has_value, value = item.partition("=")
        if not key.strip("-"):
            raise NanoMarkovError(f"--sbatch {item!r}: give KEY=VALUE, e.g. --sbatch account=mylab")
        extra[key.strip("-")] = value if has_value else True
    chosen = {
        "partition": slurm_partition,
        "gpus_per_task": gpus_per_task,
        "mem": mem,
        "array_parallelism": array_parallelism,
    }
    executor.update_parameters(
        time=time,
        cpus_per_task=cpus_per_task,
        additional_parameters=extra,
        **{k: v for k, v in chosen.items() if v is not None},
    )
    return executor


class RunJob:
    """What one array task runs: run(spec, threads), one run of the sweep; submitit calls checkpoint()
    before requeueing it. `run` travels to the job pickled, so it must be a module-level function."""

    def __init__(self, run, spec, threads):
        self.run, self.spec, self.threads = run, spec, threads

    def __call__(self):
        # train() stops cleanly (checkpoint first) on SIGTERM; SLURM's warning signal is passed on as one,
        # and once training has stopped, submitit's own handler checkpoints and requeues the job.
        warning = signal.Signals["SIG" + require_submitit().JobEnvironment.USR_SIG]
        requeue, warned = signal.getsignal(warning), []

        def stop_training(signum, frame):
            warned.append(signum)
            os.kill(os.getpid(), signal.SIGTERM)

        signal.signal(warning, stop_training)
        try:
            result = self.run(self.spec, self.threads)
        finally:
            signal.signal(warning, requeue)
        if warned and result["state"] == "pending" and callable(requeue):
            requeue(warning, None)  # submitit's handler: checkpoint(), scontrol requeue, and exit
        return result

    def checkpoint(self):
        # Nothing to add: the run's own ckpt.pt, written as training stopped, is where it resumes.
        return require_submitit().helpers.DelayedSubmission(RunJob(self.run, self.spec, self.threads))


def job_states(jobs) -> dict:
    """Each submitit job's state in sacct's words; SLURM jobs from one sacct call for all of them.
    (submitit's local executor, the tests' cluster-free stand-in, says RUNNING or FINISHED.)"""
    submitit = require_submitit()
    slurm = [job for job in jobs if isinstance(job, submitit.SlurmJob)]
    if slurm:
        slurm[0].watcher.update()
    return {
        job: (
            job.watcher.get_state(job.job_id, mode="cache").split()[0]
            if job in slurm
            else {"RUNNING": "RUNNING", "FINISHED": "COMPLETED"}.get(job.state, "FAILED")
        )
        for job in jobs
    }


def sacct_states(job_ids) -> dict:
    """SLURM's state of each job id (e.g. '12_3'), for `sweep status`; {} where sacct is not installed."""
    if not job_ids or shutil.which("sacct") is None:
        return {}
    watcher = require_submitit().SlurmJob.watcher
    for job_id in job_ids:
        watcher.register_job(job_id)
    watcher.update()
    return {job_id: watcher.get_state(job_id, mode="cache").split()[0] for job_id in job_ids}


def queued_jobs(job_ids) -> set:
    """Those of job_ids that SLURM has queued or running: squeue knows a job as soon as it is submitted, sacct may not."""
    if shutil.which("squeue") is None:
        return set()
    listed = subprocess.run(
        ["squeue", "-h", "-r", "-o", "%i", "-j", ",".join(job_ids)], capture_output=True, text=True
    ).stdout.split()  # fails on ids it has forgotten: none queued
    return set(listed) & set(job_ids)


def _outcome(job, state):
    """The run's result once its job is over: the dict its run function returned, or why there is none."""
    if state == "COMPLETED":
        try:
            return job.result()
        except Exception as e:  # noqa: BLE001 - submitit raises its own types for a missing or failed result
            return {"state": "failed", "error": f"job {job.job_id}: {(str(e).strip().splitlines() or [''])[0]}"}
    if state == "CANCELLED":
        return {
            "state": "cancelled",
            "error": f"job {job.job_id} was cancelled; run the sweep again to resume from its checkpoint",
        }
    log = [line for line in (job.stderr() or "").splitlines() if line.strip()]
    return {"state": "failed", "error": f"job {job.job_id} ended {state}" + (f"; log: {log[-1]}" if log else "")}


def run_jobs(executor, run, specs, threads, on_submit, on_start, on_finish, poll_s=1.0):
    """Submit one job per spec (one array on SLURM) running run(spec, threads), then wait, calling
    on_finish(spec, result) as each ends; on_submit gets {spec name: job id} once all are submitted."""
    submitit = require_submitit()
    try:
        with executor.batch():
            jobs = [executor.submit(RunJob(run, spec, threads)) for spec in specs]
    except (submitit.core.utils.FailedJobError, OSError) as e:
        raise NanoMarkovError(f"submission failed: {(str(e).strip().splitlines() or [''])[-1]}") from None
    waiting, submitted = dict(zip(jobs, specs)), time.time()
    on_submit({spec.name: job.job_id for job, spec in waiting.items()})
    running = set()
    while waiting:
        time.sleep(poll_s)
        for job, state in job_states(list(waiting)).items():
            spec = waiting[job]
            if state == "RUNNING" and job not in running:
                running.add(job)
                on_start(spec)
            lost = state == "UNKNOWN" and time.time() - submitted > UNKNOWN_GIVE_UP_S
            if state in ACTIVE and not lost:
                continue
            del waiting[job]
            on_finish(
                spec,
                _outcome(job, state)
                if not lost
                else {"state": "failed", "error": f"sacct does not know job {job.job_id}; is slurmdbd running?"},
            )
    return jobs
