"""What `qlora watch` draws from a QLoRAJob's status: one progress line, and the closing report. Pure.

The status is operator/qlora_api/status.py on the wire (camelCase). The ETA is the trainer's own
where it reports one (counted down since its report), else the watcher's measured step rate.
"""

from dataclasses import dataclass, field
from datetime import UTC, datetime

from qlora_cli.hints import hint_for

BAR_WIDTH = 24
TERMINAL = ("Succeeded", "Failed")


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def short_number(value: float) -> str:
    if value >= 10_000:
        return f"{value / 1000:.1f}k"
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    filled = int(round(max(0.0, min(1.0, fraction)) * width))
    return "█" * filled + "░" * (width - filled)


def condition(status: dict, ctype: str) -> dict | None:
    return next((c for c in status.get("conditions") or [] if c.get("type") == ctype), None)


def current_condition(status: dict) -> str:
    """The condition that says most about now: terminal, suspended, unschedulable, or Running's."""
    phase = status.get("phase") or "Pending"
    for ctype in ("Failed", "Succeeded", "Suspended"):
        c = condition(status, ctype)
        if c and c.get("status") == "True":
            return f"{ctype} ({c.get('reason')})"
    scheduled = condition(status, "Scheduled")
    if scheduled and scheduled.get("status") == "False":
        return f"{phase}: {scheduled.get('reason')}"
    running = condition(status, "Running")
    if running:
        return f"{phase} ({running.get('reason')})"
    return phase


@dataclass
class RateTracker:
    """Steps per second as the watcher saw them, for an ETA the trainer did not report."""

    samples: list[tuple[float, int]] = field(default_factory=list)

    def add(self, at: float, step: int) -> None:
        if not self.samples or step != self.samples[-1][1]:
            self.samples.append((at, step))
            del self.samples[:-20]

    def eta(self, step: int, total: int) -> float | None:
        if len(self.samples) < 2:
            return None
        (t0, s0), (t1, s1) = self.samples[0], self.samples[-1]
        if s1 <= s0 or t1 <= t0:
            return None
        return (total - step) / ((s1 - s0) / (t1 - t0))


def eta_seconds(progress: dict, now: datetime, rates: RateTracker | None) -> float | None:
    step, total = progress.get("step", 0), progress.get("totalSteps")
    if progress.get("etaSeconds") is not None:
        updated = parse_time(progress.get("updatedAt"))
        elapsed = (now - updated).total_seconds() if updated else 0.0
        return max(0.0, progress["etaSeconds"] - max(0.0, elapsed))
    if rates is not None and total:
        return rates.eta(step, total)
    return None


def progress_line(status: dict, now: datetime | None = None, rates: RateTracker | None = None) -> str:
    now = now or datetime.now(UTC)
    progress = status.get("progress") or {}
    step, total = progress.get("step", 0), progress.get("totalSteps")
    parts = []
    if total:
        parts.append(f"{bar(step / total)} {step}/{total} {100 * step // total:3d}%")
    else:
        parts.append(f"{bar(0)} step {step}" if progress else bar(0))
    if progress.get("loss") is not None:
        parts.append(f"loss {progress['loss']:.4g}")
    if progress.get("evalLoss") is not None:
        parts.append(f"eval {progress['evalLoss']:.4g}")
    if progress.get("tokensPerSecond"):
        parts.append(f"{short_number(progress['tokensPerSecond'])} tok/s")
    eta = eta_seconds(progress, now, rates) if status.get("phase") == "Running" else None
    if eta is not None:
        parts.append(f"ETA {duration(eta)}")
    parts.append(current_condition(status))
    return "  ".join(parts)


def closing_report(job: dict) -> tuple[bool, list[str]]:
    """(succeeded, lines) once the job is terminal: the result, or the failure reason and its hint."""
    status = job.get("status") or {}
    name = job["metadata"]["name"]
    if status.get("phase") == "Succeeded":
        result = status.get("result") or {}
        lines = [f"Succeeded: {name}"]
        lines.append(f"  adapter    {result.get('adapterUri', '?')}")
        if result.get("evalLossBefore") is not None and result.get("evalLossAfter") is not None:
            lines.append(f"  eval loss  {result['evalLossBefore']:.4g} -> {result['evalLossAfter']:.4g}")
        if result.get("totalBytes") is not None:
            lines.append(f"  files      {len(result.get('files') or [])} ({result['totalBytes'] / 1e6:.1f} MB), "
                         f"manifest sha256 {str(result.get('manifestSha256'))[:12]}")
        if result.get("trainSeconds") is not None:
            lines.append(f"  trained in {duration(result['trainSeconds'])}")
        lines.append(f"  next: qlora fetch {name} ./{name}   |   qlora serve {name} --for vllm")
        return True, lines
    failed = condition(status, "Failed") or {}
    reason, message = failed.get("reason") or "Unknown", failed.get("message") or status.get("message") or ""
    lines = [f"Failed: {name}: {reason}", f"  {message}"]
    hint = hint_for(reason, message)
    if hint:
        lines.append(f"  hint: {hint.replace('NAME', name)}")
    return False, lines
