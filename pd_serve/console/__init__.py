"""The operator console (`pd-serve console`): a command-line client of the orchestrator's HTTP
API that shows its status and sends it operator actions."""

from pd_serve.console.app import console_app
from pd_serve.console.client import ConsoleError, OrchestratorClient

__all__ = ["ConsoleError", "OrchestratorClient", "console_app"]
