"""peftc's compiler passes: match sites in the traced graph, then rewrite them (one pass, one job)."""
