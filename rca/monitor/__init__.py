"""Monitors: a confirmed verdict compiled into a run-time detector on the circuit's own
activations (``build_monitor``), judged on held-out prompts beside two baselines
(``evaluate_monitor``), and attached to a model as a guard that flags or stops a generation
(``attach``). docs/monitor.md walks the path."""

from rca.monitor.artifact import Monitor, MonitorError, load_monitor, save_monitor
from rca.monitor.build import (
    MonitorConfig,
    build_monitor,
    evaluate_monitor,
    monitor_prompts,
    monitor_sites,
)
from rca.monitor.guard import ACTIONS, Guard, attach
from rca.monitor.sites import FeatureReader, SiteSpec

__all__ = [
    "ACTIONS",
    "FeatureReader",
    "Guard",
    "Monitor",
    "MonitorConfig",
    "MonitorError",
    "SiteSpec",
    "attach",
    "build_monitor",
    "evaluate_monitor",
    "load_monitor",
    "monitor_prompts",
    "monitor_sites",
    "save_monitor",
]
