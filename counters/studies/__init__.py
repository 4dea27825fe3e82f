"""Studies built on the counts: hardware peaks, the roofline, timers, model factories, plots, and the
helpers of the benchmark and GPU-validation scripts. The counting core (``counters`` outside this
package) never imports anything from here."""
