"""Training data from where it lives (files, folders, saved datasets, the Hub) to the project's JSON-lines.

sources.py reads any of those places into a `datasets.Dataset`; recipes.py converts a named public dataset
(Tulu 3, OpenR1-Math, CodeForces-CoTs) from its real schema into training rows with a manifest.
"""
