#!/usr/bin/perl
# Cache::FastMmap side of stress/bench_store.py: one store, one round, in this fresh
# process, on the workload the Python driver wrote into --workload DIR (config.json,
# keys, values, session dicts, get order, counter sequence, retention sizes), so both
# languages run the identical sequences.  Prints one JSON object on stdout.
#
#   --serializer raw       raw_values: the 1 KiB random byte strings
#   --serializer json      the session dicts through JSON::XS (like MmapStore's JSON)
#   --serializer storable  the session dicts through Cache::FastMmap's default Storable
#   --phase ops|retention
#
# Run it through the driver: python3 stress/bench_store.py --only fastmmap
use strict;
use warnings;
use Cache::FastMmap;
use Getopt::Long qw(GetOptions);
use JSON::PP ();
use List::Util qw(max min);
use POSIX ();
use Time::HiRes qw(clock_gettime CLOCK_MONOTONIC);

my %o = (serializer => 'raw', phase => 'ops', workload => undef, dir => undef);
GetOptions(\%o, 'serializer=s', 'phase=s', 'workload=s', 'dir=s')
    or die "usage: $0 --workload DIR --dir DIR [--serializer raw|json|storable] [--phase ops|retention]\n";
die "--workload and --dir are required\n" unless defined $o{workload} && defined $o{dir};
die "--serializer must be raw, json or storable\n" unless $o{serializer} =~ /^(raw|json|storable)$/;
die "--phase must be ops or retention\n" unless $o{phase} =~ /^(ops|retention)$/;

sub now { clock_gettime(CLOCK_MONOTONIC) }

sub slurp {
    my ($name, $binary) = @_;
    open(my $fh, '<', "$o{workload}/$name") or die "cannot read $o{workload}/$name: $!\n";
    binmode $fh if $binary;
    local $/;
    my $s = <$fh>;
    close $fh;
    return $s;
}
sub lines { [split /\n/, slurp($_[0])] }

my $cfg = JSON::PP->new->decode(slurp('config.json'));
my $blob = slurp('values.bin', 1);
my $keys = lines('keys.txt');
my $n = @$keys;

# The JSON peer: JSON::XS directly, as Cache::FastMmap's own 'json' serializer does
# through JSON.pm (which would be one more package and one more call per value).
my $xs;
if ($o{serializer} ne 'raw') {
    eval { require JSON::XS; 1 }
        or die "JSON::XS is missing: apt-get install libjson-xs-perl (or cpanm JSON::XS)\n";
    $xs = JSON::XS->new->utf8->allow_nonref;
}
my $canon = $xs && JSON::XS->new->utf8->allow_nonref->canonical;    # for the read-back check only
my %ser = (
    raw      => [serializer => ''],
    storable => [serializer => 'storable'],
    json     => [serializer => [sub { $xs->encode(${ $_[0] }) }, sub { \$xs->decode($_[0]) }]],
);

my $nfile = 0;
sub cache_args {
    my ($file, $size, $init) = @_;
    # num_pages (not cache_size): FastMmap would round the page count up.
    return (share_file => $file, init_file => $init, unlink_on_exit => 0, page_size => $cfg->{page_size},
            num_pages => int($size / $cfg->{page_size}), expire_time => 0, @{ $ser{ $o{serializer} } });
}
# A fresh file of its own; init_file writes every page, before any clock starts.
sub new_cache {
    my ($size) = @_;
    my $file = "$o{dir}/fastmmap-$$-" . $nfile++;
    return (Cache::FastMmap->new(cache_args($file, $size, 1)), $file);
}

sub timed_sets {
    my ($c, $vals) = @_;
    my $t0 = now();
    $c->set($keys->[$_], $vals->[$_]) for 0 .. $n - 1;
    return { ops => $n, secs => now() - $t0 };
}

my %out = (store => 'Cache::FastMmap', version => $Cache::FastMmap::VERSION, serializer => $o{serializer},
           perl => sprintf('%vd', $^V));

if ($o{phase} eq 'ops') {
    my $vs = $cfg->{value_size};
    my @vals = $o{serializer} eq 'raw'
        ? map { substr($blob, $_ * $vs, $vs) } 0 .. $n - 1
        : map { $xs->decode($_) } @{ lines('sessions.jsonl') };
    my ($c, $file) = new_cache($cfg->{cache_size});
    my %res;
    $res{insert} = timed_sets($c, \@vals);
    my @passes;
    for my $p (1 .. $cfg->{passes}) {    # pass p writes value i + p: always a new value
        my @vp = (@vals[$p % $n .. $n - 1], @vals[0 .. $p % $n - 1]);
        push @passes, timed_sets($c, \@vp);
    }
    $res{overwrite} = { passes => \@passes };

    my @gkeys = map { $keys->[$_] } @{ lines('get_order.txt') };
    my $misses = 0;
    my $t0 = now();
    for (1 .. $cfg->{get_passes}) {
        for (@gkeys) { defined $c->get($_) or $misses++ }
    }
    $res{get} = { ops => $n * $cfg->{get_passes}, secs => now() - $t0 };
    die "get: $misses misses: the cache evicted; raise --cache-size\n" if $misses;
    # Read back what the last pass wrote (every key raw; a sample of the dicts,
    # compared as canonical JSON, which would take longer than the figures).
    my $last = $cfg->{passes} % $n;
    my $wrong = 0;
    for my $i ($o{serializer} eq 'raw' ? (0 .. $n - 1) : map { int($_ * $n / 100) } 0 .. min(99, $n - 1)) {
        my $want = $vals[($i + $last) % $n];
        my $got = $c->get($keys->[$i]);
        $wrong++ unless defined $got
            && ($o{serializer} eq 'raw' ? $got eq $want : $canon->encode($got) eq $canon->encode($want));
    }
    die "$wrong keys read back a value other than the last written\n" if $wrong;

    if ($o{serializer} eq 'raw') {
        my @ckeys = map { "counter:$_" } 0 .. $cfg->{counters} - 1;
        my $seq = lines('incr.txt');
        my $inc = sub { ($_[1] // 0) + 1 };
        $t0 = now();
        $c->get_and_set($ckeys[$_], $inc) for @$seq;
        $res{get_and_set} = { ops => scalar @$seq, secs => now() - $t0 };
        my @counts = map { $c->get($_) // 0 } @ckeys;
        my $sum = 0;
        $sum += $_ for @counts;
        $res{get_and_set}{count} = $sum;
        $res{get_and_set}{expected} = scalar @$seq;
        $res{get_and_set}{exact} = (grep { $_ != $cfg->{increments} } @counts) ? JSON::PP::false : JSON::PP::true;

        undef $c;    # closed across the fork, as on the Python side; reopened for the count
        $res{contended} = contended($file);
        $c = Cache::FastMmap->new(cache_args($file, $cfg->{cache_size}, 0));
        $res{contended}{count} = 0 + ($c->get('counter:contended') // 0);
    }
    undef $c;
    unlink $file;
    $out{results} = \%res;
}

# procs children, each with its own handle, increment one counter together: each
# reports ready, waits for "go" on a pipe, then times its own loop.
sub contended {
    my ($file) = @_;
    my ($procs, $per) = ($cfg->{procs}, $cfg->{contended});
    my (@kids, @outs);
    pipe(my $go_r, my $go_w) or die "pipe: $!";
    for (1 .. $procs) {
        pipe(my $r, my $w) or die "pipe: $!";
        my $pid = fork() // die "fork: $!";
        if (!$pid) {
            close $r; close $go_w;
            my $cc = Cache::FastMmap->new(cache_args($file, $cfg->{cache_size}, 0));
            my $inc = sub { ($_[1] // 0) + 1 };
            syswrite($w, "ready\n");
            sysread($go_r, my $buf, 1);
            my $s = now();
            $cc->get_and_set('counter:contended', $inc) for 1 .. $per;
            my $e = now();
            syswrite($w, sprintf("%.9f %.9f\n", $s, $e));
            POSIX::_exit(0);    # no destructors: the parent owns the file
        }
        close $w;
        push @kids, $pid;
        push @outs, $r;
    }
    close $go_r;
    for my $r (@outs) {
        my $l = <$r>;
        if (!$l || $l ne "ready\n") { kill 'KILL', @kids; waitpid($_, 0) for @kids; die "contended: a child failed to start\n" }
    }
    syswrite($go_w, 'g' x $procs);
    close $go_w;
    my (@s, @e);
    for my $r (@outs) {
        my $l = <$r>;
        if (!$l) { kill 'KILL', @kids; waitpid($_, 0) for @kids; die "contended: a child died\n" }
        my ($s, $e) = split ' ', $l;
        push @s, $s;
        push @e, $e;
    }
    for (@kids) { waitpid($_, 0); die "contended: a child exited $?\n" if $? }
    return { ops => $procs * $per, secs => max(@e) - min(@s), per_proc => [map { $e[$_] - $s[$_] } 0 .. $#s],
             expected => $procs * $per };
}

if ($o{phase} eq 'retention') {
    my @items = map { [split ' '] } @{ lines('retention.txt') };
    for my $fill (@{ $cfg->{fills} }) {
        my ($c, $file) = new_cache($cfg->{retention_cache_size});
        my $limit = $fill * $cfg->{retention_cache_size};
        my ($bytes, @inserted) = (0);
        for (@items) {
            last if $bytes >= $limit;
            my ($k, $size, $off) = @$_;
            $c->set($k, substr($blob, $off, $size));
            $bytes += length($k) + $size;
            push @inserted, $k;
        }
        my $kept = grep { defined $c->get($_) } @inserted;
        $out{retention}{$fill} = { inserted => scalar @inserted, kept => $kept, bytes => $bytes };
        undef $c;
        unlink $file;
    }
}

print JSON::PP->new->canonical->encode(\%out), "\n";
