"""The Ray Tune sweep: fixed schedules against AKOD, across DKO filter sizes and seeds."""
