/* Two builds of one network's PFP C timed in turns in one process (process CPU time, medians):
 * the same model compiled by two trees, one with --name old, the other with --name new, e.g.
 *   PYTHONPATH=<tree A> python -c "from pfpc.cli import main; main()" dscnn.onnx --posterior dscnn_post.npz --batch 8 --name old -o ab/old
 *   PYTHONPATH=<tree B> python -c "from pfpc.cli import main; main()" dscnn.onnx --posterior dscnn_post.npz --batch 8 --name new -o ab/new
 *   (cd ab/old && make libold.a) && (cd ab/new && make libnew.a)
 *   cc -std=c99 -O3 -Iab benchmarks/host_ab.c ab/old/libold.a ab/new/libnew.a -lm -o ab/ab && ab/ab 201
 * (the network's input named x, its output y; dscnn.onnx from `run.real_model("dscnn", dir, symbolic_batch=True)`).
 * Results: benchmarks/host_kernels.md (session 14, DS-CNN). */
#define _POSIX_C_SOURCE 199309L
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include "old/old.h"
#include "new/new.h"
static double now(void){struct timespec t;clock_gettime(CLOCK_PROCESS_CPUTIME_ID,&t);return t.tv_sec*1e6+t.tv_nsec/1e3;}
static int cmp(const void*a,const void*b){double x=*(const double*)a,y=*(const double*)b;return x<y?-1:x>y;}
static float x[OLD_X_ELEMENTS], m0[OLD_Y_ELEMENTS], v0[OLD_Y_ELEMENTS], m1[OLD_Y_ELEMENTS], v1[OLD_Y_ELEMENTS];
int main(int argc,char**argv){int turns=atoi(argv[1]); double *a=malloc(turns*sizeof(double)),*b=malloc(turns*sizeof(double));
 for(int i=0;i<OLD_X_ELEMENTS;++i)x[i]=(float)rand()/RAND_MAX-0.5f;
 old_run(x,m0,v0,NULL); new_run(x,m1,v1,NULL);
 double e=0; for(int i=0;i<OLD_Y_ELEMENTS;++i){double d=(v1[i]-v0[i])/v0[i]; if(d<0)d=-d; if(d>e)e=d;}
 for(int t=0;t<turns;++t){double s=now(); old_run(x,m0,v0,NULL); a[t]=now()-s; s=now(); new_run(x,m1,v1,NULL); b[t]=now()-s;}
 qsort(a,turns,sizeof(double),cmp); qsort(b,turns,sizeof(double),cmp);
 printf("turns %d: old %.1f us, new %.1f us (median), new/old %.3f; max rel. diff of the variances %.2g\n",turns,a[turns/2],b[turns/2],b[turns/2]/a[turns/2],e);}
