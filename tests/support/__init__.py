"""Helpers the tests share: test worlds (netns, daemons, servers) and the programs they run."""
