#!/usr/bin/perl
# Cache::FastMmap side of stress/bench_store.py: the same operations on the same
# workload, timed with Time::HiRes, results printed as one JSON object on stdout.
#
# The Python driver writes the workload (keys, mix sequences, counter sequence,
# retention sizes) into --workload DIR so both languages run the identical
# sequence; without --workload the script generates its own from --seed (same
# distributions, different draws), so it can also be run by hand:
#
#   perl stress/bench_fastmmap.pl --keys 10000 --serializer raw --phases ops,retention
#
# Mix sequences are integers v: key index v >> 1, a set when v & 1, else a get.
use strict;
use warnings;
use Cache::FastMmap;
use Getopt::Long qw(GetOptions);
use JSON::PP ();
use POSIX ();
use File::Temp qw(tempdir);
use Time::HiRes qw(clock_gettime CLOCK_MONOTONIC);

my %o = (
    keys                 => 10_000,
    'value-size'         => 1024,
    seed                 => 1,
    serializer           => 'raw',      # raw (raw_values => 1) or storable (the default)
    'get-passes'         => 5,
    'mix-ops'            => 50_000,
    'mix-procs'          => '1,2',
    'incr-ops'           => 20_000,
    counters             => 100,
    'cache-size'         => 64 << 20,
    'page-size'          => 64 << 10,
    'retention-cache-size' => 16 << 20,
    fills                => '0.85,0.70',
    'min-size'           => 512,
    'max-size'           => 4096,
    phases               => 'ops,retention',
    dir                  => undef,
    workload             => undef,
);
GetOptions(\%o, 'keys=i', 'value-size=i', 'seed=i', 'serializer=s', 'get-passes=i',
    'mix-ops=i', 'mix-procs=s', 'incr-ops=i', 'counters=i', 'cache-size=i', 'page-size=i',
    'retention-cache-size=i', 'fills=s', 'min-size=i', 'max-size=i', 'phases=s', 'dir=s',
    'workload=s')
    or die "usage: $0 [--keys N] [--serializer raw|storable] [--workload DIR] ...\n";
die "--serializer must be raw or storable\n" unless $o{serializer} =~ /^(raw|storable)$/;

my $dir = $o{dir} // tempdir('bench_fastmmap.XXXXXX', TMPDIR => 1, CLEANUP => 1);
my $raw = $o{serializer} eq 'raw';
my %phase = map { $_ => 1 } split /,/, $o{phases};
srand($o{seed});

sub now { clock_gettime(CLOCK_MONOTONIC) }

sub read_lines {
    my ($path) = @_;
    open(my $fh, '<', $path) or die "cannot read $path: $!\n";
    chomp(my @l = <$fh>);
    close $fh;
    return \@l;
}

sub rand_key { sprintf('session:%08x%08x%08x%08x', map { int(rand(2**32)) } 1 .. 4) }

sub workload_file {
    my ($name) = @_;
    return undef unless defined $o{workload};
    my $p = "$o{workload}/$name";
    return -e $p ? read_lines($p) : undef;
}

# Each cache gets a fresh file of exactly num_pages * page_size bytes: giving
# num_pages (not cache_size) stops FastMmap rounding the page count up.
my $ncache = 0;
sub open_cache {
    my ($size, $file) = @_;
    $file //= "$dir/fastmmap-$$-" . $ncache++;
    return Cache::FastMmap->new(
        share_file     => $file,
        init_file      => 1,
        unlink_on_exit => 0,
        page_size      => $o{'page-size'},
        num_pages      => int($size / $o{'page-size'}),
        expire_time    => 0,    # never expire
        ($raw ? (raw_values => 1) : ()),
    ), $file;
}

my $value = $raw ? ('x' x $o{'value-size'}) : { data => ('x' x $o{'value-size'}) };
my %res;

if ($phase{ops}) {
    my $keys = workload_file('keys.txt') // [map { rand_key() } 1 .. $o{keys}];
    my $n = @$keys;
    my ($c, $file) = open_cache($o{'cache-size'});

    my $t0 = now();
    $c->set($_, $value) for @$keys;
    $res{set} = { ops => $n, secs => now() - $t0 };

    # The same keys again: overwrites, on pages the inserts already touched.
    $t0 = now();
    $c->set($_, $value) for @$keys;
    $res{update} = { ops => $n, secs => now() - $t0 };

    my $hits = 0;
    $t0 = now();
    for (1 .. $o{'get-passes'}) {
        for (@$keys) { $hits++ if defined $c->get($_) }
    }
    $res{get} = { ops => $n * $o{'get-passes'}, secs => now() - $t0 };
    die "get: $hits hits of " . $res{get}{ops} . " (the cache evicted: raise --cache-size)\n"
        if $hits != $res{get}{ops};

    my @seqs;
    my $maxp = 0;
    for (split /,/, $o{'mix-procs'}) { $maxp = $_ if $_ > $maxp }
    for my $p (0 .. $maxp - 1) {
        $seqs[$p] = workload_file("mix_$p.txt")
            // [map { (int(rand($n)) << 1) | (rand() < 0.2 ? 1 : 0) } 1 .. $o{'mix-ops'}];
    }
    my $mix = sub {
        my ($cache, $seq) = @_;
        for my $v (@$seq) {
            if ($v & 1) { $cache->set($keys->[$v >> 1], $value) }
            else        { $cache->get($keys->[$v >> 1]) }
        }
    };
    for my $procs (split /,/, $o{'mix-procs'}) {
        if ($procs == 1) {
            $t0 = now();
            $mix->($c, $seqs[0]);
            my $secs = now() - $t0;
            $res{mix1} = { ops => scalar @{ $seqs[0] }, secs => $secs, per_proc => [$secs] };
            next;
        }
        # Children open the file themselves, report ready, wait for "go" on a
        # pipe, then time their own loop; aggregate = all ops / (last end - first start).
        my (@kids, @outs);
        pipe(my $go_r, my $go_w) or die "pipe: $!";
        for my $p (0 .. $procs - 1) {
            pipe(my $r, my $w) or die "pipe: $!";
            my $pid = fork() // die "fork: $!";
            if (!$pid) {
                close $r; close $go_w;
                my $cc = Cache::FastMmap->new(share_file => $file, init_file => 0,
                    unlink_on_exit => 0, page_size => $o{'page-size'},
                    num_pages => int($o{'cache-size'} / $o{'page-size'}), expire_time => 0,
                    ($raw ? (raw_values => 1) : ()));
                syswrite($w, "ready\n");
                sysread($go_r, my $buf, 1);
                my $s = now();
                $mix->($cc, $seqs[$p]);
                my $e = now();
                syswrite($w, sprintf("%.9f %.9f %d\n", $s, $e, scalar @{ $seqs[$p] }));
                close $w;
                POSIX::_exit(0);    # no destructors: the parent owns the file
            }
            close $w;
            push @kids, $pid;
            push @outs, $r;
        }
        close $go_r;
        for my $r (@outs) { my $l = <$r>; die "mix child failed to start\n" unless $l && $l eq "ready\n" }
        syswrite($go_w, 'g' x $procs);
        close $go_w;
        my ($first, $last, $ops, @per) = (undef, undef, 0);
        for my $r (@outs) {
            my $l = <$r> // die "mix child died\n";
            my ($s, $e, $k) = split ' ', $l;
            $first = $s if !defined $first || $s < $first;
            $last  = $e if !defined $last  || $e > $last;
            $ops += $k;
            push @per, $e - $s;
        }
        for (@kids) { waitpid($_, 0); die "mix child exited $?\n" if $? }
        $res{"mix$procs"} = { ops => $ops, secs => $last - $first, per_proc => \@per };
    }

    my $cseq = workload_file('incr.txt') // [map { int(rand($o{counters})) } 1 .. $o{'incr-ops'}];
    my @ckeys = map { "counter:$_" } 0 .. $o{counters} - 1;
    my $inc = sub { ($_[1] // 0) + 1 };
    $t0 = now();
    $c->get_and_set($ckeys[$_], $inc) for @$cseq;
    $res{incr} = { ops => scalar @$cseq, secs => now() - $t0 };
    my $total = 0;
    $total += $c->get($_) // 0 for @ckeys;
    die "get_and_set: counters sum to $total, expected " . scalar(@$cseq) . "\n"
        if $total != @$cseq;
    undef $c;
    unlink $file;
}

if ($phase{retention}) {
    my $items = workload_file('retention.txt');
    if (!$items) {
        my ($lo, $hi) = ($o{'min-size'}, $o{'max-size'});
        $items = [map { rand_key() . ' ' . ($lo + int(rand($hi - $lo + 1))) }
                  1 .. int(2 * $o{'retention-cache-size'} / $lo)];
    }
    for my $fill (split /,/, $o{fills}) {
        my ($c, $file) = open_cache($o{'retention-cache-size'});
        my $limit = $fill * $o{'retention-cache-size'};
        my ($bytes, @inserted) = (0);
        for (@$items) {
            last if $bytes >= $limit;
            my ($k, $size) = split ' ';
            my $v = 'r' x $size;
            $c->set($k, $v);
            $bytes += length($k) + $size;
            push @inserted, $k;
        }
        my $kept = grep { defined $c->get($_) } @inserted;
        $res{retention}{$fill} = { inserted => scalar @inserted, kept => $kept, bytes => $bytes };
        undef $c;
        unlink $file;
    }
}

print JSON::PP->new->canonical->encode({
    store => 'Cache::FastMmap', version => $Cache::FastMmap::VERSION,
    serializer => $raw ? 'raw_values' : 'Storable', perl => sprintf('%vd', $^V), results => \%res,
}), "\n";
