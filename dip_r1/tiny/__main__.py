"""``python -m dip_r1.tiny``: write a tiny randomly initialised checkpoint (:func:`dip_r1.tiny.checkpoints.main`)."""

from dip_r1.tiny.checkpoints import main

main()
