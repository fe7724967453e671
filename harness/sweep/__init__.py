"""The sweep runner: speed and peak memory over cases into results/ (`python -m harness sweep`)."""
