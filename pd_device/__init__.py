"""P/D-Device: a request served between the cloud (prefill, first tokens) and the device."""

from pd_device.config import DeviceConfig
from pd_device.report import DisplayEvent, RequestReport
from pd_device.runtime import DeviceRuntime
from pd_device.settings import MODES, Settings

__all__ = ["MODES", "DeviceConfig", "DeviceRuntime", "DisplayEvent", "RequestReport", "Settings"]
