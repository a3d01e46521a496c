"""Model construction and loading: SD 1.4 (hub id, local folder, single file), tiny, sd14-random, toy."""
