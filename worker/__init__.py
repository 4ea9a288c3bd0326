"""Worker entry points: the bootstep that guards each lane (see :mod:`onelane.delivery.guard`)."""
