"""Device meshes, logical-axis sharding rules and the checks that parameters really are sharded."""
