"""Energy of the stages: GPU from NVML's energy counter, CPU/RAM and CO2e from CodeCarbon's estimate."""

from dist_bench.energy.window import EnergyReading, EnergyWindow, stage_metrics, stage_tags

__all__ = ["EnergyReading", "EnergyWindow", "stage_metrics", "stage_tags"]
