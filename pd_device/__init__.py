"""P/D-Device: a request served between the cloud (prefill, first tokens) and the device."""

from pd_device.settings import MODES, Settings

__all__ = ["MODES", "Settings"]
