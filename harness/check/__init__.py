"""The correctness gate: property-based equivalence with the float64 reference (`python -m harness check`)."""
