"""The core loop: typed messages, the pure scheduler and cost model, and the executors."""
