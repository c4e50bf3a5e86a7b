"""Testing support: the pytest plugin for HIL tests on hvsim (:mod:`hvsim.testing.plugin`)."""
