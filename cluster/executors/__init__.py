"""Executors run a StepPlan: LocalExecutor on plain workers in process, RayExecutor on actors."""
