"""The orchestrator (MLOps side of P/D-Serve): registry (embedded or ZooKeeper), P/D groups per
scenario, E2E performance model, ratio planner and online adjuster, health and recovery."""
