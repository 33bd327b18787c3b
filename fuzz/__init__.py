"""``make fuzz``: seeded, structure-aware mutation fuzzing of every decoder a peer can reach.

:mod:`fuzz.mutators` makes inputs from known-good samples, :mod:`fuzz.targets` names each
decoder with its documented typed errors, and ``python -m fuzz`` runs every target in its
own memory- and time-bounded subprocess and ends by printing ``crashes=N``.
"""
