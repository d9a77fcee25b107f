"""The package logger. Everything in zerocon_core logs through ``logger``; nothing prints."""

import logging

logger = logging.getLogger("zerocon")
